"""big_vision SigLIP and SigLIP 2 checkpoints (`.npz`) as a "siglip" or "siglip2" DualEncoderConfig and params.

big_vision's two_towers saves params flattened with "/", optionally all under "params/": the image tower `img/`
(models/vit.py: `embedding` conv kernel HWIO, `pos_embedding` (1, N, D), `Transformer/encoderblock*`,
`Transformer/encoder_norm`, `MAPHead_0`), the text tower `txt/` (models/proj/image_text/text_transformer.py:
`Embed_0/embedding`, `pos_embedding` (1, L, D), `Encoder_0/encoderblock*`, `Encoder_0/encoder_norm`, `head`), and
`t`, `b`: the log logit scale and the logit bias, (1,) each. No `txt/head` at all (out_dim None, the So400m/16
i18n file) is an identity head, as transformers' conversion makes it. Encoder blocks are per layer
(`encoderblock_{i}`) or scanned (`encoderblock`, a leading depth axis on every tensor), each tower its own way;
attention kernels are big_vision's (D, heads, head_dim) for query/key/value and (heads, head_dim, D) for out,
or fused (D, D). SigLIP files (webli_en_*, webli_i18n_*) and SigLIP 2 fixed-resolution files (siglip2_*: the
same names, a 256k vocabulary) load as "siglip". SigLIP 2 NaFlex files (siglip2_*_naflex, models/proj/image_text/
naflex_vit.py), told by their Dense patch embedding `img/embedding/kernel` (p * p * C, D) over patches flattened
(row, column, channel) as ops_naflex's patchify makes them (transformers' Siglip2ImageProcessor's order, so
the kernel loads as it is) and their (G, G, D) `img/pos_embedding` grid (flattened row-major), load as "siglip2".

Read from shapes: widths, MLP sizes, depths, heads (from per-head kernels), patch size and channels (the conv
kernel; NaFlex: 3 channels unless vision_num_channels= says otherwise), image size (the square position grid
times the patch; any size giving that grid may be passed, e.g. vision_image_size=384 for So400m/14 at 384) or,
NaFlex, num_patches (the grid's G * G), vocabulary, text length, the text head's size.
`variant` ("B/16", "So400m/14", ...: big_vision's decode_variant names in VARIANTS, "/patch" optional) checks
them and gives the heads of fused kernels; the text tower is checked against `text_variant`, by default the
variant's name (SigLIP 2 g-opt/16 pairs with text "So400m"). The computation is big_vision's: LayerNorm eps
1e-6, flax's GELU (tanh approximation: "gelu_pytorch_tanh"), MAP pooling of the image, the text's last token.
`dualenc.save_pretrained(dir, *load_big_vision(path))` writes a transformers SiglipModel (Siglip2Model): a
big_vision -> transformers converter in one call.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
import zlib
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from dualenc.config import SIGLIP_LOGIT_INIT, DualEncoderConfig, Siglip2TextConfig, Siglip2VisionConfig, \
    SiglipTextConfig, SiglipVisionConfig
from dualenc.errors import CheckpointError, ConfigError
from dualenc import model, params as declare
from dualenc.formats.transformers import to_device
from dualenc.params import check_tree, listed

# big_vision.models.vit.decode_variant: name -> (width, depth, mlp_dim, num_heads).
VARIANTS = {
    "mu": (32, 1, 128, 2), "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16), "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16), "G-opt": (1536, 48, 8192, 16), "e": (1792, 56, 15360, 16),
}
_ENCODER = {"vision": "img/Transformer/", "text": "txt/Encoder_0/"}
_FROM_SHAPES = {
    "vision": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "image_size", "patch_size"),
    "text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "projection_size"),
}
_NAFLEX_FROM_SHAPES = {**_FROM_SHAPES, "vision": ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_channels", "patch_size",
                                                    "num_patches")}
# Fields that are not in the checkpoint and do not change what it computes.
_FREE = {"vision": ("attention_dropout",), "text": ("attention_dropout", "pad_token_id", "bos_token_id",
                                                    "eos_token_id")}
_VARIANT_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, read with allow_pickle=False: object arrays are refused, never unpickled."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"big_vision checkpoint not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError:  # numpy reads anything but a zip or .npy as a pickle, and refuses it unread
        raise CheckpointError(f"{path}: neither an .npz nor an .npy file: numpy would read it as pickled data, "
                              f"which dualenc never unpickles (big_vision saves an .npz of arrays)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable .npz archive (truncated or corrupt?): {e}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: holds one array (.npy), not big_vision's .npz of named arrays")
    out = {}
    with archive:
        for name in archive.files:
            try:
                value = archive[name]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                what = "a pickled object array (dualenc never unpickles)" if "pickle" in str(e) else \
                    f"unreadable (truncated or corrupt?): {e}"
                raise CheckpointError(f"{path}: tensor {name!r} is {what}") from None
            if not isinstance(value, np.ndarray):
                raise CheckpointError(f"{path}: member {name!r} is not a .npy array")
            out[name] = value
    return out


def _floating(a: np.ndarray) -> bool:
    """Floating point, or bfloat16, which numpy saves as 2-byte void (as big_vision's recover_dtype knows)."""
    d = a.dtype
    return d.kind == "f" or (d.kind == "V" and d.itemsize == 2 and d.fields is None and d.subdtype is None)


def _float32(a: np.ndarray) -> np.ndarray:
    return (a if a.dtype.kind == "f" else a.view(jnp.bfloat16)).astype(np.float32)


@dataclasses.dataclass
class _Reader:
    """The file's tensors (the "params/" prefix stripped), and how to name one of them in an error."""

    path: str
    tensors: dict[str, np.ndarray]
    prefix: str

    def show(self, name: str) -> str:
        return repr(self.prefix + name)

    def shape(self, name: str, ndims: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a tensor the config is read from."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor {self.show(name)} (the model's shape is read "
                                  f"from it)")
        shape = self.tensors[name].shape
        if len(shape) not in ndims:
            raise CheckpointError(f"{self.path}: tensor {self.show(name)} has shape {shape}, expected "
                                  f"{' or '.join(map(str, ndims))} dimensions")
        return shape

    def blocks(self, side: str) -> tuple[bool, int]:
        """(scanned, depth) of a tower's encoder."""
        enc = _ENCODER[side]
        scanned = any(n.startswith(enc + "encoderblock/") for n in self.tensors)
        pattern = re.compile(re.escape(enc) + r"encoderblock_(\d+)/")
        indices = {int(m[1]) for n in self.tensors if (m := pattern.match(n))}
        if scanned and indices:
            raise CheckpointError(f"{self.path}: holds both per-layer ({self.prefix}{enc}encoderblock_N/...) and "
                                  f"scanned ({self.prefix}{enc}encoderblock/...) encoder blocks")
        if scanned:
            return True, self.shape(enc + "encoderblock/LayerNorm_0/scale", (2,))[0]
        if not indices:
            raise CheckpointError(f"{self.path}: no {side} encoder blocks: expected {self.prefix}{enc}"
                                  f"encoderblock_0/... (per layer) or {self.prefix}{enc}encoderblock/... (scanned)")
        return False, max(indices) + 1

    @property
    def naflex(self) -> bool:
        """A SigLIP 2 NaFlex image tower: a Dense patch embedding (p * p * C, D) instead of the conv's HWIO."""
        return len(self.shape("img/embedding/kernel", (2, 4))) == 2


@dataclasses.dataclass
class _Tower:
    scanned: bool
    fused: bool  # attention kernels (D, D) instead of big_vision's per-head (D, heads, head_dim)
    fields: dict  # config fields read from shapes (num_attention_heads None when fused)
    source: dict  # field -> the tensor it was read from
    headless: bool = False  # a text tower without txt/head (out_dim None): the identity


def _tower(r: _Reader, side: str, channels: int = 3) -> _Tower:
    """A tower's layout and shape-read fields; `channels` splits a NaFlex kernel's p * p * C rows."""
    scanned, depth = r.blocks(side)
    enc, lead = _ENCODER[side], int(scanned)
    block = enc + ("encoderblock/" if scanned else "encoderblock_0/")
    query = r.shape(block + "MultiHeadDotProductAttention_0/query/kernel", (2 + lead, 3 + lead))
    fused = len(query) == 2 + lead
    mlp = r.shape(block + "MlpBlock_0/Dense_0/kernel", (2 + lead,))[-1]
    fields = dict(num_hidden_layers=depth, intermediate_size=mlp, num_attention_heads=None if fused else query[-2])
    source = dict(num_hidden_layers=enc + ("encoderblock/LayerNorm_0/scale" if scanned else "encoderblock_N"),
                  intermediate_size=block + "MlpBlock_0/Dense_0/kernel",
                  num_attention_heads=block + "MultiHeadDotProductAttention_0/query/kernel")
    headless = False
    if side == "vision" and r.naflex:
        rows, width = r.shape("img/embedding/kernel", (2,))
        patch = math.isqrt(rows // channels)
        if patch * patch * channels != rows:
            raise ConfigError(f"{r.path}: {r.show('img/embedding/kernel')} has {rows} rows, not channels x patch^2 "
                              f"for {channels} channels: pass the image's vision_num_channels=")
        grid = r.shape("img/pos_embedding", (3,))
        if grid[0] != grid[1]:
            raise ConfigError(f"{r.path}: {r.show('img/pos_embedding')} {grid} is not a square (G, G, D) grid, as "
                              f"big_vision naflex_vit's learn_2d position embedding is")
        fields.update(hidden_size=width, num_channels=channels, patch_size=patch, num_patches=grid[0] * grid[1])
        source.update(dict.fromkeys(("hidden_size", "patch_size", "num_channels"), "img/embedding/kernel"),
                      num_patches="img/pos_embedding")
    elif side == "vision":
        ph, pw, channels, width = r.shape("img/embedding/kernel", (4,))
        positions = r.shape("img/pos_embedding", (3,))[1]
        grid = math.isqrt(positions)
        if ph != pw or grid * grid != positions:
            raise ConfigError(f"{r.path}: non-square patches {(ph, pw)} or position grid ({positions} positions) "
                              f"are not implemented; supported: square images of square patches")
        fields.update(hidden_size=width, num_channels=channels, patch_size=ph, image_size=grid * ph)
        source.update(dict.fromkeys(("hidden_size", "num_channels", "patch_size"), "img/embedding/kernel"),
                      image_size="img/pos_embedding")
    else:
        vocab, width = r.shape("txt/Embed_0/embedding", (2,))
        # No head at all (so400m/16 i18n, out_dim None) is the identity, as transformers' conversion makes it.
        headless = not {"txt/head/kernel", "txt/head/bias"} & set(r.tensors)
        fields.update(vocab_size=vocab, hidden_size=width, max_position_embeddings=r.shape("txt/pos_embedding",
                                                                                           (3,))[1],
                      projection_size=width if headless else r.shape("txt/head/kernel", (2,))[1])
        source.update(dict.fromkeys(("vocab_size", "hidden_size"), "txt/Embed_0/embedding"),
                      max_position_embeddings="txt/pos_embedding",
                      projection_size="txt/Embed_0/embedding" if headless else "txt/head/kernel")
    source = {k: r.show(v) for k, v in source.items()}
    if side == "vision" and "image_size" in fields:
        p, g = fields["patch_size"], fields["image_size"]
        source["image_size"] += f" (a {g // p}x{g // p} grid of {p}-pixel patches: {g} to {g + p - 1} pixels)"
    elif side == "vision":
        source["num_channels"] += f" (its p * p * C rows, read with C = {channels})"
    return _Tower(scanned, fused, fields, source, headless)


def _parse_variant(variant: str, argument: str, where: str) -> tuple[tuple[int, int, int, int], int | None]:
    if not isinstance(variant, str):
        raise ConfigError(f"{where}: {argument} must be a string such as 'B/16', got {variant!r}")
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or (patch and not patch.isdigit()):
        raise ConfigError(f"{where}: {argument}={variant!r} is not a big_vision variant; supported: "
                          f"NAME or NAME/PATCH with NAME one of {sorted(VARIANTS)}")
    return VARIANTS[name], int(patch) if patch else None


def _resolve(tower: _Tower, side: str, variant, variant_arg: str, hint: str, overrides: dict, where: str,
             names: tuple[str, ...]) -> dict:
    """The tower's config fields: shapes, checked against the variant and overrides; heads filled in if fused."""
    fields = dict(tower.fields)
    if variant is not None:
        dims, patch = _parse_variant(variant, variant_arg, where)
        wanted = dict(zip(_VARIANT_FIELDS, dims))
        if side == "vision" and patch is not None:
            wanted["patch_size"] = patch
        for key, value in wanted.items():
            if fields[key] is None:
                fields[key] = value
            elif fields[key] != value:
                raise ConfigError(f"{where}: {variant_arg} {variant!r} has {side} {key} {value}, but the "
                                  f"checkpoint's is {fields[key]} (from {tower.source[key]}); {hint}, or none")
    for key in names:
        given = overrides.get(f"{side}_{key}", fields[key])
        same = given == fields[key]
        if key == "image_size":  # the convolution drops a remainder under a patch (So400m/14 at 384: 27x27)
            same = isinstance(given, int) and given // fields["patch_size"] == fields[key] // fields["patch_size"]
        if fields[key] is not None and not same:
            raise ConfigError(f"{where}: {side}_{key}={given!r} disagrees with the checkpoint's shapes: "
                              f"{fields[key]} (from {tower.source[key]})")
        fields[key] = given
    if fields["num_attention_heads"] is None:
        raise ConfigError(f"{where}: the {side} attention kernels are fused ({tower.source['num_attention_heads']} "
                          f"is (D, D)), so the number of heads cannot be read from shapes: pass variant= (e.g. "
                          f"'B/16'{', or text_variant=' if side == 'text' else ''}) or {side}_num_attention_heads=")
    return {**fields, **{k: overrides[f"{side}_{k}"] for k in _FREE[side] if f"{side}_{k}" in overrides}}


def _config(r: _Reader, variant=None, text_variant=None, **overrides) -> tuple[DualEncoderConfig, dict]:
    """The SigLIP (SigLIP 2 NaFlex) config the tensors' shapes (a variant, overrides) describe; each tower's layout."""
    naflex = r.naflex
    names = _NAFLEX_FROM_SHAPES if naflex else _FROM_SHAPES
    accepted = {f"{s}_{k}" for s in names for k in names[s] + _FREE[s]}
    accepted |= {"logit_scale_init_value", "logit_bias_init_value"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ConfigError(f"load_big_vision: unknown argument(s) {unknown}; accepted: variant, text_variant, "
                          f"stacked, {', '.join(sorted(accepted))} (the rest is big_vision's, fixed)")
    channels = overrides.get("vision_num_channels", 3)
    channels = channels if isinstance(channels, int) and not isinstance(channels, bool) and channels > 0 else 3
    towers = {side: _tower(r, side, channels) for side in names}
    text_arg, text_hint = "text_variant", "pass the matching text_variant="
    if text_variant is None and isinstance(variant, str):  # big_vision pairs e.g. g-opt/16 with text So400m
        text_variant = variant.partition("/")[0]
        text_arg, text_hint = "variant (its name, for the text tower)", "pass text_variant= (the text tower's own)"
    fields = {"vision": _resolve(towers["vision"], "vision", variant, "variant", "pass the matching variant=",
                                 overrides, r.path, names["vision"]),
              "text": _resolve(towers["text"], "text", text_variant, text_arg, text_hint, overrides, r.path,
                               names["text"])}
    width, projection = fields["vision"]["hidden_size"], fields["text"]["projection_size"]
    if width != projection:
        raise ConfigError(f"{r.path}: the text head projects to {projection} ("
                          f"{towers['text'].source['projection_size']}) but the image tower is {width} wide ("
                          f"{towers['vision'].source['hidden_size']}): SigLIP compares the two directly")
    scale, bias = SIGLIP_LOGIT_INIT
    vision_cls, text_cls = (Siglip2VisionConfig, Siglip2TextConfig) if naflex else (SiglipVisionConfig,
                                                                                    SiglipTextConfig)
    try:
        vision = vision_cls(**fields["vision"], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        text = text_cls(**fields["text"], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        config = DualEncoderConfig(
            vision=vision, text=text, projection_dim=vision.hidden_size,
            model_type="siglip2" if naflex else "siglip",
            logit_scale_init_value=overrides.get("logit_scale_init_value", scale),
            logit_bias_init_value=overrides.get("logit_bias_init_value", bias))
    except ConfigError as e:
        raise ConfigError(f"{r.path}: {e}") from None
    return config, towers


_SIDES = {"vision": "img/", "text": "txt/"}  # where two_towers keeps each tower's names


# The shape in the file of a param part (one layer's; one of a packed in_proj's q, k, v) stored in big_vision's
# layout (dualenc.params.Param.bv_kind), given its tower's heads (None: fused attention kernels).
_FILE_SHAPE = {
    "id": lambda s, h: s,
    "conv": lambda s, h: (s[1], s[2], s[0], s[3]),  # HWIO, on NHWC images
    "pos": lambda s, h: (1, *s),
    "grid": lambda s, h: (math.isqrt(s[0]),) * 2 + s[1:],  # naflex_vit's learn_2d grid, flattened row-major
    "cls": lambda s, h: (1, 1, *s),
    "scalar": lambda s, h: (1,),
    "heads_in": lambda s, h: s if h is None else (s[0], h, s[1] // h),
    "heads_bias": lambda s, h: s if h is None else (h, s[0] // h),
    "heads_out": lambda s, h: s if h is None else (h, s[0] // h, s[1]),
}


class _Row(NamedTuple):
    """A param and where the file holds it: for each of its big_vision names (several: a packed in_proj's q, k,
    v), the tensors (one per layer; one, with a leading depth axis, for a scanned encoder), each of `shape`."""

    param: declare.Param
    files: list[list[str]]
    part: tuple[int, ...]  # one name's share of the param (one layer's)
    shape: tuple[int, ...]


def _table(config: DualEncoderConfig, towers: dict) -> list[_Row]:
    """Every param of the model and its tensors, from its specs' big_vision names; a text tower without a head
    (out_dim None) is left out (its identity head is made, not read)."""
    out = []
    for p in model.specs(config):
        side = p.path[0] if p.path[0] in _SIDES else None
        if side == "text" and towers["text"].headless and p.path[1] == "head":
            continue
        heads = None if side is None or towers[side].fused else getattr(config, side).num_attention_heads
        part = p.shape[:-1] + (p.shape[-1] // len(p.bv),) if p.shape else ()
        shape = _FILE_SHAPE[p.bv_kind](part, heads)
        names = [_SIDES.get(side, "") + name for name in p.bv]
        if p.layers is None:
            out.append(_Row(p, [[n] for n in names], part, shape))
        elif towers[side].scanned:
            out.append(_Row(p, [[n.format(blk="encoderblock")] for n in names], part, (p.layers, *shape)))
        else:
            out.append(_Row(p, [[n.format(blk=f"encoderblock_{i}") for i in range(p.layers)] for n in names],
                            part, shape))
    return out


def _check(r: _Reader, table: list[_Row], towers: dict, config: DualEncoderConfig):
    """One CheckpointError listing every missing, unexpected, mis-shaped and non-float tensor."""
    expected = {r.prefix + n: row.shape for row in table for names in row.files for n in names}
    got = {r.prefix + n: a.shape for n, a in r.tensors.items()}
    not_float = [f"{name} of dtype {r.tensors[name[len(r.prefix):]].dtype} (expected floating point)"
                 for name, shape in expected.items()
                 if got.get(name) == shape and not _floating(r.tensors[name[len(r.prefix):]])]
    layouts = ", ".join(f"{s} {'scanned' if t.scanned else 'per-layer'}" + (" fused" if t.fused else "")
                        for s, t in towers.items())
    kind = "SigLIP 2 NaFlex" if isinstance(config.vision, Siglip2VisionConfig) else "SigLIP"
    check_tree(expected, got, f"{r.path} does not match the big_vision {kind} model its shapes describe "
                              f"({layouts})", noun="tensor", error=CheckpointError, also_wrong=not_float)


def _params(r: _Reader, table: list[_Row], towers: dict, config: DualEncoderConfig) -> dict:
    """The params the checked tensors hold: per-head kernels flatten (heads, head_dim) in row-major order, as
    transformers' q/k/v/out do; a packed in_proj concatenates q, k, v on its output axis."""
    params: dict = {}
    for row in table:
        lead = () if row.param.layers is None else (row.param.layers,)
        values = []
        for names in row.files:
            value = np.stack([_float32(r.tensors[n]) for n in names]) if len(names) > 1 else \
                _float32(r.tensors[names[0]])
            if row.param.bv_kind == "conv":  # HWIO on NHWC images -> (C, p, p, D) on NCHW pixel_values
                value = value.transpose(2, 0, 1, 3)
            values.append(value.reshape(lead + row.part))
        node = params
        for key in row.param.path[:-1]:
            node = node.setdefault(key, {})
        node[row.param.path[-1]] = values[0] if len(values) == 1 else np.concatenate(values, axis=-1)
    if towers["text"].headless:
        d = config.text.hidden_size
        params["text"]["head"] = {"kernel": np.eye(d, dtype=np.float32), "bias": np.zeros(d, np.float32)}
    return params


def load_big_vision(path: str | os.PathLike, *, variant: str | None = None, text_variant: str | None = None,
                    stacked: bool = False, **overrides) -> tuple[DualEncoderConfig, dict]:
    """Loads a big_vision SigLIP / SigLIP 2 (fixed resolution or NaFlex) `.npz` as (config, params), strictly.

    Args:
      path: the .npz file, read with allow_pickle=False only.
      variant: big_vision's image variant ("B/16", "So400m/14", "B" for NaFlex, ...): checks shapes, gives the heads
        of fused kernels. text_variant: the text tower's (default: the variant's name).
      stacked: each encoder stacked on a leading depth axis (see dualenc.init); default per layer.
      **overrides: `vision_<field>` / `text_<field>` config fields. Those read from shapes (hidden_size,
        num_attention_heads, image_size or NaFlex num_patches, vocab_size, ...) must agree; text_pad_token_id,
        text_bos_token_id, text_eos_token_id (the tokenizer's), vision_/text_attention_dropout,
        logit_scale_init_value and logit_bias_init_value are set.

    Returns:
      (a model_type "siglip" DualEncoderConfig, or "siglip2" for NaFlex, params) giving big_vision's embeddings
      and logits; `dualenc.save_pretrained(dir, config, params)` makes it a transformers SiglipModel (Siglip2Model)
      directory.

    Raises:
      CheckpointError: an unreadable, truncated or pickled file; missing, unexpected or mis-shaped tensors, all
        listed with the file. ConfigError: shapes that disagree with the variant or an override, heads that
        cannot be read (fused kernels and no variant), other architectures.
    """
    path = os.fspath(path)
    tensors = read_npz(path)
    prefix = "params/" if any(n.startswith("params/") for n in tensors) else ""
    stripped = {n[len(prefix):]: a for n, a in tensors.items() if n.startswith(prefix)}
    extra = stripped.pop("txt/Encoder_0/pos_embedding", None)
    if extra is not None:  # big_vision's text_transformer.load: older files add a second posemb; it sums the two
        base = stripped.get("txt/pos_embedding")
        if base is None or base.shape != extra.shape or not (_floating(base) and _floating(extra)):
            raise CheckpointError(f"{path}: {prefix}txt/Encoder_0/pos_embedding {extra.shape} needs a floating "
                                  f"{prefix}txt/pos_embedding of the same shape to be added to")
        stripped["txt/pos_embedding"] = _float32(base) + _float32(extra)
    reader = _Reader(path, stripped, prefix)
    strays = [n for n in tensors if not n.startswith(prefix)]
    if strays:
        raise CheckpointError(f"{path}: holds tensors outside {prefix!r} beside those under it: {listed(strays)}")
    config, towers = _config(reader, variant, text_variant, **overrides)
    table = _table(config, towers)
    _check(reader, table, towers, config)
    return config, to_device(_params(reader, table, towers, config), stacked)
