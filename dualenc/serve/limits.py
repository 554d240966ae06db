"""What a request may hold, checked before any work: the body's size, the number of inputs, texts' lengths, images
(base64 or data URLs only, never fetched; their pixels counted from the header before decoding), top_k; each
problem an ApiError naming the field."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import re
import warnings

DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.I)
SCHEME = re.compile(r"[a-z][a-z0-9+.-]{1,15}:", re.I)  # http:, file:, ftp:, ... (not a one-letter drive "C:")
BASE64_SPACE = re.compile(rb"\s+")


class ApiError(Exception):
    """A request the service refuses: an HTTP status (4xx), a message, the field it is about, an error type."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "field": self.field, "type": self.kind}}


@dataclasses.dataclass(frozen=True)
class Limits:
    """The service's limits (every one checked before the work it bounds)."""

    max_body_bytes: int = 32 << 20
    max_inputs: int = 256  # texts and images of one /v1/embeddings request, images of one /v1/classify
    max_text_chars: int = 4096
    max_pixels: int = 25_000_000  # an image's width x height, read from its header before it is decoded
    max_labels: int = 1000
    max_prompts: int = 4096  # labels x templates of one /v1/classify
    max_top_k: int = 100
    timeout_s: float = 30.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{field.name} must be a positive number, got {value!r}")


def parse_json(body: bytes):
    """The request's JSON object; a 400 naming "body" when it is not JSON, a 422 when it is not an object."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", "body") from None
    if not isinstance(value, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {type(value).__name__}", "body")
    return value


def known_fields(body: dict, allowed: set[str]) -> None:
    extra = sorted(k for k in body if k not in allowed)
    if extra:
        raise ApiError(422, f"unknown field {extra[0]!r} (known: {', '.join(sorted(allowed))})", extra[0])


def text(value, field: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ApiError(422, f"{field} must be a string, got {type(value).__name__}", field)
    if not value.strip():
        raise ApiError(422, f"{field} is empty", field)
    if len(value) > limits.max_text_chars:
        raise ApiError(413, f"{field} holds {len(value)} characters, more than {limits.max_text_chars}", field,
                       "too_large")
    return value


def count(values, field: str, most: int, what: str) -> list:
    if not isinstance(values, list):
        raise ApiError(422, f"{field} must be a list of {what}, got {type(values).__name__}", field)
    if not values:
        raise ApiError(422, f"{field} is empty", field)
    if len(values) > most:
        raise ApiError(413, f"{field} holds {len(values)} {what}, more than {most} per request", field, "too_large")
    return values


def image_bytes(value, field: str, limits: Limits) -> bytes:
    """An image given as base64 or a data URL ("data:image/png;base64,..."), decoded and its pixels counted.

    A URL of any other scheme is refused: the service never fetches anything a request names."""
    if not isinstance(value, str):
        raise ApiError(422, f"{field} must be a base64 string or a data URL, got {type(value).__name__}", field)
    head = DATA_URL.match(value)
    if head:
        if ";base64" not in head.group(2).lower():
            raise ApiError(400, f"{field}: a data URL must be base64 (data:image/png;base64,...)", field)
        value = value[head.end():]
    elif SCHEME.match(value):
        scheme = SCHEME.match(value).group(0)
        raise ApiError(400, f"{field}: URLs ({scheme}...) are not fetched: send the image itself, base64 or as a "
                            f"data URL", field, "url_refused")
    try:
        data = base64.b64decode(BASE64_SPACE.sub(b"", value.encode("ascii")), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ApiError(400, f"{field} is not valid base64", field) from None
    if not data:
        raise ApiError(422, f"{field} is empty", field)
    check_pixels(data, field, limits)
    return data


def check_pixels(data: bytes, field: str, limits: Limits) -> None:
    """Reads the image's header only (no pixel is decoded): an unreadable image is a 400, one of more than
    limits.max_pixels pixels a 413 (a decompression bomb among them; the processor's own rule,
    dualenc.processing's, refuses beyond twice PIL.Image.MAX_IMAGE_PIXELS as well)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
    except Image.DecompressionBombError:
        raise ApiError(413, f"{field}: the image has too many pixels (a decompression bomb)", field,
                       "too_large") from None
    except (OSError, ValueError, SyntaxError):
        raise ApiError(400, f"{field} is not an image pillow can read", field) from None
    if width * height > limits.max_pixels:
        raise ApiError(413, f"{field}: the image is {width}x{height}, more than {limits.max_pixels} pixels",
                       field, "too_large")
    if not width or not height:
        raise ApiError(400, f"{field}: the image is empty ({width}x{height})", field)


def top_k(value, limits: Limits, count_: int) -> int:
    if value is None:
        value = 10
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"top_k must be an integer, got {type(value).__name__}", "top_k")
    if not 1 <= value <= limits.max_top_k:
        raise ApiError(422, f"top_k must be from 1 to {limits.max_top_k}, got {value}", "top_k")
    return min(value, count_)
