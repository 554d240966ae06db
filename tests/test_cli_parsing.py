"""The command line's own parsing: --version, and mistyped commands and options named with the closest ones."""

import platform

import jax
import pytest

import dualenc
from dualenc import cli


def fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == (f"dualenc {dualenc.__version__} (jax {jax.__version__}, Python "
                                               f"{platform.python_version()})")


def test_a_mistyped_option_shows_the_subcommands_usage_and_the_closest_option(capsys):
    err = fails(["zero-shot", "--model", "m", "--lables", "cat,dog", "photo.jpg"], capsys)
    assert err.startswith("usage: dualenc zero-shot") and "--labels-file" in err  # the subcommand's usage
    assert err.strip().endswith("dualenc zero-shot: error: unrecognized option --lables (did you mean --labels?)")
    # even where a required option is missing too (argparse would report that first), and in --flag=value form
    err = fails(["embed", "--model", "m", "--images", "a.png", "--outt=x.safetensors"], capsys)
    assert "unrecognized option --outt (did you mean --out?)" in err and "required" not in err
    err = fails(["train", "--model", "m", "--data", "d.jsonl", "--out", "o", "--stpes", "5"], capsys)
    assert "--stpes (did you mean --steps?)" in err
    assert "did you mean" not in fails(["search", "--model", "m", "--index", "i", "--zzzzzz", "q"], capsys)


def test_a_mistyped_command_names_the_closest(capsys):
    err = fails(["trian", "--steps", "3"], capsys)
    assert "unknown command 'trian' (did you mean train?)" in err and "zero-shot" in err
    # abbreviations argparse accepts, values after --, and negative numbers still parse
    args = cli.parse(["zero-shot", "--model", "m", "--labels", "a,b", "--top", "-1", "--", "--odd-name.png"])
    assert args.labels == "a,b" and args.top_k == -1 and args.images == ["--odd-name.png"]


def test_a_closed_pipe_ends_the_command_quietly():
    """`dualenc search ... | head` printed "error: [Errno 32] Broken pipe"; it now stops quietly with 141."""
    import subprocess
    import sys

    script = ("import sys\nfrom dualenc import cli\nfrom dualenc.cli import inference\n"
              "def flood(args):\n    for i in range(10**6):\n        print('line', i)\n    return 0\n"
              "inference.cmd_demo = flood\nsys.exit(cli.main(['demo']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""
