"""The subcommands of embedding indexes: embed (streamed, in shards), merge, search (exact or ANN)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Iterator, NamedTuple

from dualenc.cli.support import (CommandError, CompileNotice, at_least, batch_rows, image_files, load_model, note,
                                plural, print_json, read_lines, require, shown, warn_unknown_words)
from dualenc.cli.options import (PRECISIONS, device_batch, images_options, precision_dtype, precision_option,
                                 subcommand)

TEXT_CHUNK_BATCHES = 32  # batches of texts encoded per call (their embeddings are written before the next)
QUERY_BATCH = {"image": 32, "text": 64}  # search's queries per forward pass (encode_images' and encode_texts')


class _NothingRead(Exception):
    """No image of embed's inputs could be read (the writer is aborted)."""


class ImageSource(NamedTuple):
    """What `dualenc embed --images` encodes: (name, image) pairs in order (an image being anything the image
    processor reads: a path, an EncodedImage, a PIL image, an array), the rows of every forward batch, header fields
    saying which slice of the inputs this is, the number of inputs (None where unknown before reading: tars), and
    a list the pairs' generator fills with the inputs it could not even hand over ({"image", "error"})."""

    pairs: Iterator[tuple[str, Any]]
    batch_rows: int
    metadata: dict[str, str]
    total: int | None
    problems: list


def image_source(inputs: list[str], *, batch_size: int, shard: tuple[int, int] | None,
                 strict: bool = False, image_root: str | None = None, allow_outside: bool = False) -> ImageSource:
    """The images of `dualenc embed --images INPUT...`, or with `shard` (i, n) the i-th of n contiguous slices of
    them, from one of three kinds of input:

    - image files as given and folders walked recursively, in sorted order;
    - a folder written by `dualenc prepare` (ArrayRecord shards), its records in order, named by their keys;
    - webdataset tars (paths, globs or brace patterns such as 'data/{00000..00009}.tar'), their samples in order,
      named by their keys; samples need an image, not a caption.

    File and record slices hold whole batches, so every image is encoded in the same batch, at the same place, as
    by one process: shards 0..n-1 merged in order give one process's index bit for bit. Tars are split by whole
    tars (contiguous runs of them, as a tar's samples are not counted before it is read): the merged index then
    names the same images in the same order as one process's. image_root and allow_outside are a prepared
    folder's (`RecordSource`): where its records' image paths are read from, and whether its manifest may name
    a root outside it.
    """
    from dualenc.data import expand_shards
    from dualenc.data.prepare import TAR_SUFFIXES
    from dualenc.data.records import MANIFEST

    problems: list = []
    prepared = [i for i in inputs if os.path.isfile(os.path.join(i, MANIFEST))]
    if prepared and len(inputs) > 1:
        raise CommandError(f"--images takes one folder written by `dualenc prepare`, alone; got {len(inputs)} "
                           f"inputs ({shown(prepared[0])} is one)")
    if prepared:
        require("array_record", "data", "a folder written by `dualenc prepare`")
        return _record_source(inputs[0], batch_size, shard, strict, problems, image_root, allow_outside)
    if image_root is not None or allow_outside:
        raise CommandError("--image-root and --allow-outside apply to a folder written by `dualenc prepare`; "
                           "--images names none")
    tars = [i.lower().endswith(TAR_SUFFIXES) for i in inputs]
    if any(tars):
        if not all(tars):
            raise CommandError("--images takes webdataset tars or image files and folders, not both: "
                               + " ".join(shown(i) for i, t in zip(inputs, tars) if not t))
        listed = expand_shards(inputs)
        source = _tar_source(listed, batch_size, shard, strict, problems)
        return source._replace(metadata={**source.metadata, **_inputs(shard, map(shown, listed))})
    paths = image_files(inputs)
    rows = batch_rows(len(paths), batch_size)
    start, stop, metadata = _slice(len(paths), rows, shard, map(shown, paths))
    return ImageSource(((shown(p), p) for p in paths[start:stop]), rows, metadata, stop - start, problems)


def _record_source(folder: str, batch_size: int, shard, strict: bool, problems: list, image_root=None,
                   allow_outside=False) -> ImageSource:
    from dualenc.data import RecordSource, decode_record
    from dualenc.data.records import record_image
    from dualenc.errors import DataError

    source = RecordSource(folder, image_root=image_root, allow_outside=allow_outside)
    rows = batch_rows(len(source), batch_size)
    shards = (json.dumps(s, sort_keys=True) for s in source.manifest["shards"])
    start, stop, metadata = _slice(len(source), rows, shard, shards)

    def pairs():
        for at in range(start, stop, rows):
            batch = range(at, min(at + rows, stop))
            for i, raw in zip(batch, source.__getitems__(batch)):
                try:
                    record = decode_record(raw)
                    image = record_image(record, record.key, source.image_root)
                    if image is None:
                        raise DataError(f"the image {record.path!r} lies outside the data folder")
                    yield record.key, image
                except DataError as e:
                    if strict:
                        raise CommandError(f"{folder}: record {i}: {e}") from None
                    problems.append({"image": f"record {i}", "error": shown(str(e))})

    return ImageSource(pairs(), rows, metadata, stop - start, problems)


def _tar_source(tars: list[str], batch_size: int, shard, strict: bool, problems: list) -> ImageSource:
    import collections

    from dualenc.data import iter_tar
    from dualenc.data.webdataset import BATCH_BYTES, MAX_IMAGE
    from dualenc.processing import EncodedImage

    first, last, metadata = 0, len(tars), {}
    if shard is not None:
        (i, n), total = shard, len(tars)
        first, last = i * total // n, (i + 1) * total // n
        metadata = {"shard": f"{i}/{n}", "shard_tars": f"{first}:{last}", "shard_of_tars": str(total)}
    mine = tars[first:last]
    batch_size = batch_rows(None, batch_size)
    max_image = min(MAX_IMAGE, BATCH_BYTES // batch_size)  # the encoded images of one batch: BATCH_BYTES at most

    def pairs():
        for tar in mine:
            skipped = collections.Counter()
            for sample in iter_tar(tar, skipped, captioned=False, max_image=max_image):
                yield sample.key, EncodedImage(sample.key, sample.image)
            if skipped:
                error = _tar_problem(skipped, max_image, batch_size)
                if strict:
                    raise CommandError(f"{tar}: {error}")
                problems.append({"image": tar, "error": error})

    return ImageSource(pairs(), batch_size, metadata, None, problems)


def _tar_problem(skipped, max_image: int, batch_size: int) -> str:
    """One tar's problems: its damage ("not a tar", "truncated tar", ...), then its samples skipped by reason."""
    from dualenc.data.webdataset import BATCH_BYTES, TAR_DAMAGE

    parts = [reason for reason in TAR_DAMAGE if skipped.get(reason)]
    samples = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()) if reason not in TAR_DAMAGE)
    if samples:
        parts.append(f"samples skipped: {samples}")
    if skipped.get("image too large"):
        parts[-1] += (f" (over {max_image / 2 ** 20:g} MiB: a batch of {batch_size} images holds at most "
                      f"{BATCH_BYTES >> 30} GiB; a smaller --batch-size admits larger ones)")
    return "; ".join(parts)


def _slice(total: int, rows: int, shard: tuple[int, int] | None,
           inputs: Iterable[str]) -> tuple[int, int, dict[str, str]]:
    """The [start, stop) of the shard's contiguous slice of `total` inputs, cut between batches of `rows`, and
    the header fields saying so (with the fingerprint of the whole list of `inputs`)."""
    if shard is None:
        return 0, total, {}
    i, n = shard
    batches = -(-total // rows)
    start, stop = i * batches // n * rows, min((i + 1) * batches // n * rows, total)
    return start, max(start, stop), {"shard": f"{i}/{n}", "shard_rows": f"{start}:{max(start, stop)}",
                                     "shard_of": str(total), **_inputs(shard, inputs)}


def _inputs(shard: tuple[int, int] | None, inputs: Iterable[str]) -> dict[str, str]:
    """A shard's shard_inputs_sha256: the fingerprint of the whole list its slice was cut from, which `dualenc
    merge` compares across the parts."""
    from dualenc.search.index import inputs_fingerprint

    return {} if shard is None else {"shard_inputs_sha256": inputs_fingerprint(inputs)}


def _shard(args) -> tuple[tuple[int, int] | None, bool]:
    """(i, n) from --shard i/n, else from jax.distributed when it runs several processes; and whether it came
    from jax.distributed."""
    if args.shard:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
        except ValueError:
            raise CommandError(f"--shard must be I/N (this process's slice I of N, from 0), got {args.shard!r}") \
                from None
        if not 0 <= i < n:
            raise CommandError(f"--shard {args.shard}: I must be from 0 to N-1")
        return (i, n), False
    import jax

    if jax.process_count() > 1:  # only where jax.distributed was initialised: the command never does it
        return (jax.process_index(), jax.process_count()), True
    return None, False


def cmd_embed(args) -> int:
    from dualenc import encode
    from dualenc.search import index

    if bool(args.images) == bool(args.texts):
        raise CommandError("give either --images or --texts")
    _check_out(args.out)
    batch_size = device_batch(args.batch_size, "embed")
    dtype = precision_dtype(args.precision)
    shard, distributed = _shard(args)
    if shard is not None and args.ann:
        raise CommandError("--ann indexes a whole collection, not a shard: give it to `dualenc merge`")
    if args.ann:
        require("faiss", "search", "--ann")
    kind = "image" if args.images else "text"
    if args.images:
        source = image_source(args.images, batch_size=batch_size, shard=shard, strict=args.strict,
                              image_root=args.image_root, allow_outside=args.allow_outside)
        sliced, rows = source.metadata, source.batch_rows
    else:
        texts = read_lines(args.texts, "texts")
        rows = batch_rows(len(texts), batch_size)
        start, stop, sliced = _slice(len(texts), rows, shard, texts)
    _make_folder(args.out)
    config, params, processor = load_model(args.model)
    out = args.out
    if distributed:  # every process was given the same --out
        out = f"{out[:-len('.safetensors')]}-{shard[0]:05d}-of-{shard[1]:05d}.safetensors"
    metadata = {"model": args.model, "model_sha256": index.model_fingerprint(params), "precision": args.precision,
                **sliced}
    params = encode.replicate(params)  # on this process's devices, once for every batch
    skipped, written = [], None
    try:
        with index.IndexWriter(out, config.projection_dim, kind, metadata) as writer, \
                CompileNotice("embed", f"the {kind} tower for batch {rows}"):
            if args.images:
                skipped = _write_images(writer, params, config, processor, source, args.strict, dtype)
            else:
                _write_texts(writer, params, config, processor, texts[start:stop], rows, dtype)
            if not writer.count and shard is None:
                raise _NothingRead
        written = writer.count
    except _NothingRead:
        pass
    problems = source.problems if args.images else []
    if skipped:
        of = f" of {source.total}" if source.total is not None else ""
        note("embed", f"skipped {plural(len(skipped), 'unreadable image')}{of} (--strict stops at the first):")
        for item in skipped:
            print(f"  {item['image']}: {item['error']}", file=sys.stderr)
    if problems:
        note("embed", "left out (--strict stops at the first):")
        for item in problems:
            print(f"  {item['image']}: {item['error']}", file=sys.stderr)
    if written is None:
        note("embed", f"error: no image could be read: nothing written to {out}")
        return 1
    where = ""
    if shard and "shard_rows" in sliced:
        where = f" (shard {shard[0]}/{shard[1]}: inputs {sliced['shard_rows']} of {sliced['shard_of']})"
    elif shard:
        where = f" (shard {shard[0]}/{shard[1]}: tars {sliced['shard_tars']} of {sliced['shard_of_tars']})"
    print(f"wrote {plural(written, f'{kind} embedding')} ({config.projection_dim} dims) to {out}{where}"
          + (f"; skipped {len(skipped)} unreadable" if skipped else ""), file=sys.stderr)
    ann = _build_ann(out, "embed") if args.ann else None
    if args.json:
        print_json({"out": out, "kind": kind, "written": written, "dims": config.projection_dim,
                    "skipped": skipped, **({"left_out": problems} if args.images else {}),
                    **({"shard": f"{shard[0]}/{shard[1]}"} if shard else {}), **({"ann": ann} if ann else {})})
    return 0


def _check_out(out: str) -> None:
    if not out.endswith(".safetensors"):
        raise CommandError(f"--out must name a .safetensors file, got {out}")
    if os.path.isdir(out):
        raise CommandError(f"--out {out} is a folder: name the .safetensors file to write in it")


def _make_folder(out: str) -> None:
    """Creates --out's folder (and its parents), as train and eval create theirs."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CommandError(f"--out {out}: {folder} is not a folder")
    os.makedirs(folder, exist_ok=True)


def _write_images(writer, params, config, processor, source: ImageSource, strict: bool, dtype=None) -> list[dict]:
    """Streams the source's images through the model (dtype: the matmuls' compute dtype) into the writer;
    returns the unreadable ones."""
    from dualenc import encode

    pending, failures, skipped = {}, None if strict else [], []

    def images():
        for i, (name, image) in enumerate(source.pairs):
            pending[i] = name
            yield image

    def drain():
        while failures and len(skipped) < len(failures):
            i, message = failures[len(skipped)]
            skipped.append({"image": pending.pop(i), "error": shown(message)})

    for positions, embeds in encode.stream_images(params, config, processor, images(),
                                                    batch_size=source.batch_rows, skipped=failures,
                                                    dtype=dtype):
        drain()
        writer.add(embeds, [pending.pop(int(p)) for p in positions])
    drain()
    return skipped


def _write_texts(writer, params, config, processor, texts: list[str], rows: int, dtype=None) -> None:
    """Encodes the texts a chunk of batches at a time into the writer, every batch `rows` rows (dtype: the
    matmuls' compute dtype)."""
    from dualenc import encode

    step = rows * TEXT_CHUNK_BATCHES
    for at in range(0, len(texts), step):
        chunk = texts[at:at + step]
        embeds = encode.encode_texts(params, config, processor, iter(chunk), batch_size=rows, progress=False,
                                     dtype=dtype)
        writer.add(embeds, [shown(t) for t in chunk])


def _build_ann(path: str, command: str) -> dict:
    from dualenc.search import ann

    info = ann.build(path)
    note(command,
         f"built the ANN index {ann.paths(path)[0]} (faiss HNSW{info['hnsw_m']}, efSearch "
         f"{info['ef_search']}) in {info['build_seconds']:.1f} s: recall@10 against exact search "
         f"{info['recall_at_10']:.3f} on {info['sample_queries']} of its rows as queries")
    return info


def cmd_merge(args) -> int:
    from dualenc.search import index

    _check_out(args.out)
    for part in args.parts:
        if not os.path.isfile(part):
            raise CommandError(f"index file not found: {part}")
    if args.ann:
        require("faiss", "search", "--ann")
    _make_folder(args.out)
    merged = index.merge(args.parts, args.out)
    print(f"merged {plural(len(args.parts), 'index', 'indexes')} into {args.out}: "
          f"{plural(merged.count, f'{merged.kind} embedding')} ({merged.dims} dims)", file=sys.stderr)
    ann = _build_ann(args.out, "merge") if args.ann else None
    if args.json:
        print_json({"out": args.out, "kind": merged.kind, "written": merged.count, "dims": merged.dims,
                    "parts": len(args.parts), **({"ann": ann} if ann else {})})
    return 0


def cmd_search(args) -> int:
    import numpy as np

    import dualenc
    from dualenc.search import ann
    from dualenc.search import index
    from dualenc.errors import InputError

    if not os.path.isfile(args.index):
        raise CommandError(f"index file not found: {args.index}")
    at_least(args.top_k, "--top-k")
    opened = index.open_index(args.index)
    precision = _index_precision(opened)
    use_ann = True if args.ann else False if args.exact else None
    if index.wants_ann(opened, use_ann):
        require("faiss", "search", "--ann" if args.ann else f"the ANN index beside {args.index}",
                None if args.ann else "pass --exact")
    queries = image_files(args.query) if args.image else args.query
    config, params, processor = load_model(args.model)
    if opened.dims != config.projection_dim:
        raise CommandError(f"{args.index} holds {opened.dims}-dim embeddings, the model makes "
                           f"{config.projection_dim}")
    if not args.any_model:
        try:
            checked = index.check_model(opened, params, name=f"--model {args.model}")
        except InputError as e:
            raise CommandError(f"{e}: their scores would not compare; --any-model searches it anyway") from None
        if not checked:
            note("search", f"warning: {args.index} records no model fingerprint (model_sha256): whether "
                           f"{args.model} embedded it is not checked")
    if "embeddings_sha256" not in opened.metadata:
        note("search", f"warning: {args.index} records no checksum of its rows (embeddings_sha256): they are not "
                       f"checked")
    kind = "image" if args.image else "text"
    if precision != "float32":
        note("search", f"the queries are encoded in {precision}, as {args.index} was (its precision)")
    dtype = precision_dtype(precision)
    rows = batch_rows(len(queries), QUERY_BATCH[kind])
    with CompileNotice("search", f"the {kind} tower for batch {rows}"):
        if args.image:
            embeds = dualenc.encode_images(params, config, processor, queries, batch_size=QUERY_BATCH[kind],
                                           dtype=dtype)
        else:
            warn_unknown_words(processor, queries, ("query", "queries"), "search")
            embeds = dualenc.encode_texts(params, config, processor, queries, batch_size=QUERY_BATCH[kind],
                                          dtype=dtype)
    result = index.search(opened, embeds, args.top_k, ann=use_ann)
    if result.method == "ann":
        note("search", f"approximate search (ANN index {ann.paths(args.index)[0]}) of "
                       f"{plural(opened.count, 'embedding')}; its recall@10 against exact search, measured when it "
                       f"was built: {result.recall_at_10:.3f} (--exact for the exact search)")
    else:
        note("search", f"exact search of {plural(opened.count, 'embedding')}"
             + (f" ({result.note})" if result.note else ""))
    hit_rows = np.unique(result.rows[result.rows >= 0])
    names = dict(zip(hit_rows.tolist(), map(shown, opened.names(hit_rows.tolist()))))
    found = []
    for query, scores, hits in zip(queries, result.scores, result.rows):
        item = {"query": shown(query), "search": result.method,
                "results": [{"name": names[i], "score": round(float(s), 6)}
                            for s, i in zip(scores.tolist(), hits.tolist()) if i >= 0]}
        if result.method == "ann":
            item["ann_recall_at_10"] = result.recall_at_10
        found.append(item)
    if args.json:
        print_json(found)
    else:
        for i, item in enumerate(found):
            if len(found) > 1:
                print(("\n" if i else "") + f"{item['query']}:")
            for r in item["results"]:
                print(f"{r['score']:.4f}  {r['name']}")
    return 0


def _index_precision(opened) -> str:
    """The precision an index records (`dualenc embed --precision`; float32 for indexes written before it was
    recorded), which its queries are encoded in."""
    precision = opened.metadata.get("precision", "float32")
    if precision not in PRECISIONS:
        raise CommandError(f"{opened.path} records the precision {shown(str(precision))[:40]!r}, not one of "
                           f"{', '.join(PRECISIONS)}")
    return precision


EXAMPLES = {
    'embed': 'dualenc embed --model dualenc-demo/model --images dualenc-demo/data/images/test --out digits.safetensors',
    'search': 'dualenc search --model dualenc-demo/model --index digits.safetensors "a photo of the digit seven" "the number 3"',
    'merge': 'dualenc merge digits.safetensors --out digits-all.safetensors --ann',
}


def register(subs) -> None:
    """Adds embed, search, merge to the `dualenc` command's subparsers."""
    p = subcommand(subs, EXAMPLES, "embed", cmd_embed, "write normalised embeddings of images or texts to a safetensors file (and "
                                       "their names beside it), streamed a batch at a time")
    p.add_argument("--model", required=True, help="a dual encoder directory")
    p.add_argument("--images", nargs="+", help="image files or folders (walked recursively, in sorted order) or "
                                               "quoted patterns ('photos/**/*.jpg'); or "
                                               "webdataset tars ('data/{00000..00009}.tar', 'data/*.tar'); or a "
                                               "folder written by `dualenc prepare` (ArrayRecord)")
    p.add_argument("--texts", help="or: a file with one text per line")
    p.add_argument("--out", required=True, help="the .safetensors file to write (NAME.names.jsonl goes beside it; "
                                                "its folder is created)")
    p.add_argument("--shard", metavar="I/N", help="embed only the I-th (from 0) of N contiguous slices of the "
                                                  "sorted inputs, cut between batches (give every part the same "
                                                  "--batch-size and devices of the same count); `dualenc merge` "
                                                  "joins the N parts (default: all; under jax.distributed, this "
                                                  "process's slice, on its own devices, written to "
                                                  "NAME-0000I-of-0000N.safetensors)")
    p.add_argument("--ann", action="store_true", help="also build the approximate-search index NAME.faiss "
                                                      "(needs dualenc[search]) and print its recall@10")
    images_options(p, "images or texts")
    precision_option(p)
    p.add_argument("--image-root", help="with a folder `dualenc prepare` wrote from caption files: the folder its "
                                        "records' image paths are read from (default: the one its manifest "
                                        "names, which must lie inside the prepared folder)")
    p.add_argument("--allow-outside", action="store_true", help="with a prepared folder: accept the image root its "
                                                                "manifest names outside it")
    p.add_argument("--json", action="store_true", help="print one JSON object: what was written and skipped")

    p = subcommand(subs, EXAMPLES, "search", cmd_search, "find the nearest images or texts of an embedding file to queries")
    p.add_argument("--model", required=True, help="the dual encoder that wrote the index")
    p.add_argument("--index", required=True, help="an embedding file written by `dualenc embed` (the queries are "
                                                  "encoded in the precision it records)")
    p.add_argument("--image", action="store_true", help="the queries are images: files, folders (walked "
                                                        "recursively) or quoted patterns ('photos/*.jpg')")
    p.add_argument("--top-k", type=int, default=5, help="results per query")
    p.add_argument("--any-model", action="store_true",
                   help="search even an index that another model embedded (its model_sha256 differs from --model's)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--ann", action="store_true", help="search the ANN index NAME.faiss (built by embed or merge "
                                                        "--ann; default: it is used when there is one, the index "
                                                        "holds 200,000 rows or more and the ANN's measured recall@10 "
                                                        "is at least 0.9)")
    how.add_argument("--exact", action="store_true", help="search every row, even where an ANN index would be used")
    p.add_argument("--json", action="store_true", help="print a JSON list: each query with its results and the "
                                                       "search used")
    p.add_argument("query", nargs="+", help="one or more queries (the model loads once)")

    p = subcommand(subs, EXAMPLES, "merge", cmd_merge, "join embedding files (the shards of `dualenc embed --shard`, in order) into "
                                       "one, streamed")
    p.add_argument("parts", nargs="+", metavar="PART", help="embedding files; shards all N of them, 0 to N-1")
    p.add_argument("--out", required=True, help="the .safetensors file to write (its folder is created)")
    p.add_argument("--ann", action="store_true", help="also build the approximate-search index NAME.faiss "
                                                      "(needs dualenc[search]) and print its recall@10")
    p.add_argument("--json", action="store_true", help="print one JSON object: what was written")
