"""Checkpoint key tables: how a transformers tensor name maps to a param path, and the layout transforms.

A tower's table is derived from its params' declarations (dualenc.params.hf_table); dualenc.formats reads and
writes through it. A "{i}" in a name marks the layer index, which scatters into the stacked depth axis.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from dualenc.errors import CheckpointError


class Entry(NamedTuple):
    hf: str  # transformers name; "{i}" marks the layer index
    path: tuple[str, ...]  # where it lives in the params tree (layers stacked on axis 0)
    kind: str  # layout transform, see TO_PARAM


TO_PARAM: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda a: a,
    "linear": lambda a: a.T,  # torch Linear (out, in) -> kernel (in, out)
    "conv": lambda a: a.transpose(1, 2, 3, 0),  # torch Conv2d (D, C, p, p) -> (C, p, p, D)
    "cls": lambda a: a.reshape(a.shape[-1]),  # ViT cls_token (1, 1, D) -> (D,)
    "pos": lambda a: a.reshape(a.shape[1:]),  # ViT position_embeddings (1, N, D) -> (N, D)
    "scalar": lambda a: a.reshape(()),  # SigLIP's logit_scale / logit_bias (1,) -> ()
    "temperature": lambda a: -np.log(_positive(a)),  # ALIGN's temperature t (logits = cos / t) -> log(1 / t)
}
TO_HF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 0, 1, 2),
    "cls": lambda a: a.reshape(1, 1, -1),
    "pos": lambda a: a[None],
    "scalar": lambda a: a.reshape(1),
    "temperature": lambda a: np.exp(-a),
}


def _positive(a: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(a) & (a > 0)):
        raise CheckpointError(f"a temperature must be a positive finite number, got {a.tolist()!r}")
    return a


def prefixed(prefix: str, path: tuple[str, ...], table: list[Entry]) -> list[Entry]:
    """The same entries under a name prefix and a param path prefix."""
    return [Entry(prefix + e.hf, path + e.path, e.kind) for e in table]


# CLIP's encoder layer (its parts as dualenc.params.encoder names them), shared by its vision and text towers.
CLIP_LAYER = dict(query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
                  out="self_attn.out_proj", attention_norm="layer_norm1", fc1="mlp.fc1", fc2="mlp.fc2",
                  mlp_norm="layer_norm2")
