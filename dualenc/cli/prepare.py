"""`dualenc prepare`: webdataset tars and caption files converted to ArrayRecord shards, resumably."""

from __future__ import annotations

import os
import sys

from dualenc.cli.support import CommandError, note, plural, print_json, require, shown
from dualenc.cli.options import data_options, subcommand

PLAIN_STEPS = 10  # without a terminal, a progress line each time another tenth of the input bytes is done


def _skips(skipped: dict) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) or "none"


class _Progress:
    """prepare's progress through the bytes of its inputs (a tar is read whole into its shard, a caption file a
    byte range per shard): one tqdm bar when stderr is a terminal, else at most PLAIN_STEPS plain lines."""

    def __init__(self, files: list[str], show: bool):
        self.total = sum(os.path.getsize(f) for f in files)
        self.done = self.shards = self.records = self.kept = self.kept_records = 0
        self.show, self.bar, self.step = show, None, 0
        if show and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the processing extra is not installed: plain lines
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=self.total, desc="preparing", unit="B", unit_scale=True, unit_divisor=1024,
                                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def __call__(self, entry: dict, reused: bool) -> None:
        size = entry["bytes"][1] - entry["bytes"][0] if "bytes" in entry else os.path.getsize(entry["input"])
        self.done, self.shards, self.records = self.done + size, self.shards + 1, self.records + entry["records"]
        if reused:
            self.kept, self.kept_records = self.kept + 1, self.kept_records + entry["records"]
        if self.bar is not None:
            self.bar.set_postfix_str(f"{plural(self.shards, 'shard')}, {self.records:,} records", refresh=False)
            self.bar.update(min(size, self.total - self.bar.n))
            return
        step = PLAIN_STEPS * self.done // max(self.total, 1)
        if self.show and step > self.step:
            self.step = step
            note("prepare", f"{min(100, 100 * self.done // max(self.total, 1))}% of the input bytes: "
                            f"{plural(self.shards, 'shard')}, {self.records:,} records")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()


def cmd_prepare(args) -> int:
    from dualenc.data import expand_shards, prepare
    from dualenc.data.webdataset import TAR_DAMAGE

    if args.records_per_shard < 1:
        raise CommandError(f"--records-per-shard must be 1 or more, got {args.records_per_shard}")
    require("array_record", "data", "`dualenc prepare`")
    progress = _Progress(expand_shards(args.inputs), show=not args.json)
    try:
        manifest = prepare(args.inputs, args.out, records_per_shard=args.records_per_shard,
                           image_root=args.image_root, allow_outside=args.allow_outside, progress=progress)
    finally:
        progress.close()
    if progress.kept:
        note("prepare", f"kept {plural(progress.kept, 'shard')} ({progress.kept_records:,} records) that an earlier "
                        f"run of the same inputs finished")
    shards = manifest["shards"]
    note("prepare", f"{plural(manifest['records'], 'record')} in {plural(len(shards), 'shard')} in "
                    f"{shown(str(args.out))}; skipped: {_skips(manifest['skipped'])}")
    for entry in shards:  # a tar that could not be read, or not to its end
        damage = [reason for reason in TAR_DAMAGE if entry["skipped"].get(reason)]
        if damage:
            note("prepare", f"{shown(entry['input'])}: {', '.join(damage)}")
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
