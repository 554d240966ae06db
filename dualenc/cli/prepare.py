"""`dualenc prepare`: webdataset tars and caption files converted to ArrayRecord shards, resumably."""

from __future__ import annotations

import sys

from dualenc.cli.common import CommandError, note, print_json, shown
from dualenc.cli.options import data_options, subcommand


def _skips(skipped: dict) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) or "none"


def cmd_prepare(args) -> int:
    from dualenc.datasets import prepare

    if args.records_per_shard < 1:
        raise CommandError(f"--records-per-shard must be 1 or more, got {args.records_per_shard}")

    kept = []

    def progress(entry: dict, reused: bool) -> None:
        if reused:
            kept.append(entry)
        elif not args.json:
            print(f"  {entry['file']}: {entry['records']} records from {shown(entry['input'])} (skipped: "
                  f"{_skips(entry['skipped'])})", file=sys.stderr, flush=True)

    manifest = prepare(args.inputs, args.out, records_per_shard=args.records_per_shard,
                       image_root=args.image_root, allow_outside=args.allow_outside, progress=progress)
    if kept:
        note("prepare", f"kept {len(kept)} shard(s) ({sum(e['records'] for e in kept)} records) that an earlier run "
                        f"of the same inputs finished")
    shards = manifest["shards"]
    note("prepare", f"{manifest['records']} records in {len(shards)} shard(s) in {shown(str(args.out))}; "
                    f"skipped: {_skips(manifest['skipped'])}")
    if manifest["skipped"].get("path outside the data folder"):
        note("prepare", "rows naming images outside the data folder were skipped: pass --image-root DIR to read "
                        "the paths relative to another folder, or --allow-outside to accept them")
    if args.json:
        print_json({"out": shown(str(args.out)), "records": manifest["records"], "skipped": manifest["skipped"],
                    "shards": [{**{k: e[k] for k in ("file", "records", "skipped")}, "input": shown(e["input"])}
                               for e in shards],
                    "image_root": manifest["image_root"] and shown(manifest["image_root"])})
    return 0


EXAMPLES = {
    'prepare': 'dualenc prepare dualenc-demo/data/train.jsonl --out dualenc-prepared --records-per-shard 500',
}


def register(subs) -> None:
    """Adds prepare to the `dualenc` command's subparsers."""
    p = subcommand(subs, EXAMPLES, "prepare", cmd_prepare, "convert webdataset tars and caption files (.jsonl, .csv, .tsv) to "
                                           "ArrayRecord shards with a manifest, for fast random access; a rerun "
                                           "resumes")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="tar shards (patterns such as 'data/{00000..00009}.tar' "
                                                              "or 'data/*.tar') and caption files")
    p.add_argument("--out", required=True, help="the folder for the shards and manifest.json (new, empty, or an "
                                                "unfinished run of the same inputs)")
    p.add_argument("--records-per-shard", type=int, default=50_000, help="records per shard of a caption file (each "
                                                                         "tar becomes one shard)")
    data_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: records, skipped, shards")
