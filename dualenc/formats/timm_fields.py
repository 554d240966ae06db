"""The vision_cfg fields every timm tower of open_clip's is read with (dualenc.formats.open_clip_timm and the family
modules beside it): a field with a few accepted values, timm_drop_path, a square image size."""

from __future__ import annotations

from typing import Any, Mapping

from dualenc.errors import ConfigError


def accepted(v: Mapping, key: str, default, allowed, where: str, tower: str):
    """v[key] (default when absent), refused with a ConfigError naming the field, the value and the values `allowed`
    for a timm `tower` tower unless it is one of them (equal and of the same type: True is not 1)."""
    value = v.get(key, default)
    if not any(value == ok and type(value) is type(ok) for ok in allowed):
        raise ConfigError(f"{where}: field '{key}' = {value!r} is not implemented for a timm {tower} tower; "
                          f"supported: {list(allowed)}")
    return value


def drop_path_rate(v: Mapping[str, Any], where: str) -> float:
    """timm_drop_path: null (none) or a rate in [0, 1)."""
    rate = v.get("timm_drop_path")
    rate = 0.0 if rate is None else rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"{where}: field 'timm_drop_path' must be null or a rate in [0, 1), got {rate!r}")
    return float(rate)


def square_image_size(v: Mapping[str, Any], where: str) -> int:
    """image_size (224 when absent): a positive integer, or a square [n, n] read as n."""
    size = v.get("image_size", 224)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{where}: field 'image_size' = {v.get('image_size')!r} is not implemented; supported: a "
                          f"positive integer or a square [n, n]")
    return size
