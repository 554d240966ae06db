"""`dualenc interpolate`: the weight-space interpolation of two models of one architecture (WiSE-FT)."""

from __future__ import annotations

import math
import os

from dualenc.cli.options import subcommand
from dualenc.cli.support import CommandError, load_model


def cmd_interpolate(args) -> int:
    import dualenc
    from dualenc.hub import resolve
    from dualenc.train.averaging import interpolate

    if not math.isfinite(args.alpha):
        raise CommandError(f"--alpha must be a finite number, got {args.alpha}")
    out = os.path.realpath(args.out)
    for flag, path in (("A", args.a), ("B", args.b)):
        if os.path.isdir(path) and os.path.realpath(path) == out:
            raise CommandError(f"--out {args.out} is model {flag}: write the interpolated model to another folder")
    config, params_a, processor = load_model(args.a)
    path_b = resolve(args.b)
    if not os.path.isdir(path_b):
        raise CommandError(f"model directory not found: {path_b}")
    config_b, params_b = dualenc.load_pretrained(path_b)
    if config_b != config:
        raise CommandError(f"{args.a} and {args.b} are not one architecture: their configs differ in "
                           f"{', '.join(_differences(config.to_dict(), config_b.to_dict()))}")
    params = interpolate(params_a, params_b, args.alpha)
    dualenc.save_pretrained(args.out, config, params, processor=processor)
    print(f"wrote {args.out}: {1 - args.alpha:g} * {args.a} + {args.alpha:g} * {args.b} "
          f"(with {args.a}'s processor files)")
    return 0


def _differences(a: dict, b: dict, where: str = "") -> list[str]:
    """The config.json keys whose values differ, as "vision_config.hidden_size (768 vs 1024)"."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{where}{key}.")
        elif x != y:
            out.append(f"{where}{key} ({x!r} vs {y!r})")
    return out[:10] or ["the config's type"]


EXAMPLES = {
    'interpolate': 'dualenc interpolate dualenc-demo/model dualenc-tuned --alpha 0.5 --out dualenc-wise',
}


def register(subs) -> None:
    """Adds interpolate to the `dualenc` command's subparsers."""
    p = subcommand(subs, EXAMPLES, "interpolate", cmd_interpolate,
                   "mix the weights of two models of one architecture, (1 - alpha) * A + alpha * B (WiSE-FT: A the "
                   "model before fine-tuning, B after), and save the result with A's processor files")
    p.add_argument("a", metavar="A", help="a dual encoder directory (or Hugging Face model id): alpha 0 gives it")
    p.add_argument("b", metavar="B", help="a dual encoder of the same config: alpha 1 gives it")
    p.add_argument("--alpha", type=float, default=0.5, help="B's weight; outside [0, 1] it extrapolates")
    p.add_argument("--out", required=True, help="folder for the interpolated model (written atomically)")
