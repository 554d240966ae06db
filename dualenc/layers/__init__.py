"""The layers every tower is built from, by job: primitives (dense, layer norm, activations, dropout), initialisers,
the two encoder layouts, multi-head attention (implementations chosen by name) and the encoder stack.

Params are plain dicts. Kernels are (in, out). Matmuls run in the compute `dtype`; LayerNorm statistics and
softmax run in float32. The encoder's per-layer params carry a leading depth axis and run under `lax.scan`.
"""

from dualenc.layers.transformer import EncoderSpec, block, encoder, mlp
from dualenc.layers.initialisers import (
    NORMAL_CHUNK, Normal, clip_init_stds, init_params, xavier_stds)
from dualenc.layers.layout import Split, num_layers, run_blocks, stack_layers, unstack_layers
from dualenc.layers.multihead import (
    IMPLEMENTATIONS, Implementation, attention, attention_bias, default_attention, implementation,
    resolve_attention)
from dualenc.layers.primitives import (
    ACTIVATIONS, Params, Rows, TowerOutput, bernoulli, dense, dropout, layer_norm, lead, pick_rows, tower_output)

__all__ = [
    "ACTIVATIONS", "EncoderSpec", "IMPLEMENTATIONS", "Implementation", "NORMAL_CHUNK", "Normal", "Params", "Rows",
    "Split", "TowerOutput", "attention", "attention_bias", "bernoulli", "block", "clip_init_stds", "default_attention",
    "dense", "dropout", "encoder", "implementation", "init_params", "layer_norm",
    "lead", "mlp", "num_layers", "pick_rows", "resolve_attention", "run_blocks", "stack_layers",
    "tower_output", "unstack_layers", "xavier_stds",
]
