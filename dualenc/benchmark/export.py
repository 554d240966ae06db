"""Writes a dataset in CLIP_benchmark's webdataset layout (what its `clip_benchmark_export_wds` writes and
dualenc.benchmark.datasets reads): ROOT/{split}/{0..n-1}.tar with nshards.txt, each sample a key, a PNG (or the
image's own encoded bytes) and a `cls` label or `txt` captions; ROOT/classnames.txt,
zeroshot_classification_templates.txt and dataset_type.txt. Every file is written atomically."""

from __future__ import annotations

import io
import os
import tarfile
from typing import Iterable, Sequence

from dualenc import files
from dualenc.errors import InputError

SHARD_SIZE = 10_000  # samples per tar


def _image_bytes(image) -> tuple[bytes, str]:
    """(encoded bytes, extension) of a PIL image (PNG), an array (PNG) or (bytes, ext) as given."""
    if isinstance(image, tuple):
        data, ext = image
        if ext not in ("webp", "png", "jpg", "jpeg"):
            raise InputError(f"image extension must be webp, png, jpg or jpeg, got {ext!r}")
        return bytes(data), ext
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_split(root: str | os.PathLike, split: str, samples: Iterable, *, shard_size: int = SHARD_SIZE) -> int:
    """Writes one split's samples, shard_size per tar; returns the number written.

    Args:
      samples: (key, image, target) per sample: image a PIL image, an array or (encoded bytes, extension);
        target an int class label (written as `cls`) or a sequence of captions (`txt`, one per line).
    """
    if not isinstance(split, str) or not split or "/" in split or split.startswith("."):
        raise InputError(f"split must be a plain folder name, got {split!r}")
    folder = os.path.join(os.fspath(root), split)
    os.makedirs(folder, exist_ok=True)
    count, shard, tar, tmp = 0, 0, None, None
    keys = set()

    def close():
        tar.close()
        os.replace(tmp, os.path.join(folder, f"{shard}.tar"))

    try:
        for key, image, target in samples:
            if not isinstance(key, str) or not key or "." in key or "/" in key or key in keys:
                raise InputError(f"sample {count}: key {key!r} must be a unique name without '.' or '/'")
            keys.add(key)
            if tar is None:
                tmp = os.path.join(folder, f".{shard}.tar.tmp")
                tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            data, ext = _image_bytes(image)
            _add(tar, f"{key}.{ext}", data)
            if isinstance(target, (int,)) and not isinstance(target, bool):
                _add(tar, f"{key}.cls", str(target).encode())
            elif isinstance(target, Sequence) and not isinstance(target, str) and target \
                    and all(isinstance(c, str) and c.strip() and "\n" not in c for c in target):
                _add(tar, f"{key}.txt", "\n".join(target).encode())
            else:
                raise InputError(f"sample {key}: target must be a class index or a non-empty list of one-line "
                                 f"captions, got {target!r}")
            count += 1
            if count % shard_size == 0:
                close()
                shard, tar = shard + 1, None
        if tar is not None:
            close()
            shard += 1
    finally:
        if tar is not None and not tar.closed:
            tar.close()
            os.remove(tmp)
    if not count:
        raise InputError(f"split {split!r}: no samples to write")
    files.write_text_atomic(os.path.join(folder, "nshards.txt"), f"{shard}\n")
    return count


def write_metadata(root: str | os.PathLike, *, classnames: Sequence[str] | None = None,
                   templates: Sequence[str] | None = None, retrieval: bool = False) -> None:
    """Writes the root's classnames.txt, zeroshot_classification_templates.txt (each when given) and
    dataset_type.txt ("retrieval" or "classification")."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    for name, lines in (("classnames.txt", classnames), ("zeroshot_classification_templates.txt", templates)):
        if lines is None:
            continue
        lines = list(lines)
        if not lines or not all(isinstance(x, str) and x.strip() and "\n" not in x for x in lines):
            raise InputError(f"{name}: give a non-empty list of one-line strings")
        files.write_text_atomic(os.path.join(root, name), "\n".join(lines) + "\n")
    files.write_text_atomic(os.path.join(root, "dataset_type.txt"),
                            ("retrieval" if retrieval else "classification") + "\n")
