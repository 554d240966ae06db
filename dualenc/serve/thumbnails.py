"""Thumbnails of an index's images: only names the index holds, only files under the image root (no '..', no
path or symlink leading out of it), each decoded once its header passed the pixel limit, kept in a small cache."""

from __future__ import annotations

import collections
import io
import os
import threading
import warnings

from dualenc.serve.limits import ApiError, Limits, check_pixels

THUMBNAIL_SIZE = 256
CACHE_ENTRIES = 512
MAX_FILE_BYTES = 64 << 20


class Thumbnails:
    """PNG thumbnails (at most THUMBNAIL_SIZE a side) of the images an index names, read under `root`.

    Args:
      root: the folder the index's names are paths in (relative names are joined to it; an absolute name must
        lie in it too).
      names: the names the index holds; no other file is ever read.
    """

    def __init__(self, root: str, names, limits: Limits):
        self.root = os.path.realpath(root)
        self.names = names
        self.limits = limits
        self.cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.lock = threading.Lock()

    def path(self, name: str) -> str:
        """The file of an indexed name, inside the root; an ApiError (404, 403) otherwise."""
        if name not in self.names:
            raise ApiError(404, "no image of that name in the index", "name", "not_found")
        parts = name.replace("\\", "/").split("/")
        if "\x00" in name or ".." in parts:
            raise ApiError(403, "the name climbs out of the image root ('..')", "name", "forbidden")
        joined = os.path.join(self.root, name)  # an absolute name replaces the root: checked below
        real = os.path.realpath(joined)
        if os.path.commonpath([real, self.root]) != self.root:
            raise ApiError(403, "the image lies outside the image root (an absolute path or a symlink out of it)",
                           "name", "forbidden")
        if not os.path.isfile(real):
            raise ApiError(404, "the image file is not under the image root", "name", "not_found")
        return real

    def get(self, name: str) -> bytes:
        with self.lock:
            if name in self.cache:
                self.cache.move_to_end(name)
                return self.cache[name]
        data = self._make(self.path(name))
        with self.lock:
            self.cache[name] = data
            while len(self.cache) > CACHE_ENTRIES:
                self.cache.popitem(last=False)
        return data

    def _make(self, path: str) -> bytes:
        from PIL import Image, ImageOps

        if os.path.getsize(path) > MAX_FILE_BYTES:
            raise ApiError(413, "the image file is too large for a thumbnail", "name", "too_large")
        with open(path, "rb") as f:
            data = f.read()
        check_pixels(data, "name", self.limits)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as opened:
                    image = ImageOps.exif_transpose(opened)
                    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                    if image.mode not in ("RGB", "RGBA", "L", "LA"):
                        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
                    out = io.BytesIO()
                    image.save(out, format="PNG")
        except (OSError, ValueError, SyntaxError):
            raise ApiError(415, "the image file cannot be read", "name", "unreadable") from None
        return out.getvalue()
