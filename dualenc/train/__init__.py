"""Contrastive training.

- state.py (the train state, LiT locking, LoRA's adapters), optimizer.py (AdamW, decay mask, layer-wise decay),
  averaging.py (EMA, WiSE-FT), sharding.py (meshes, FSDP and tensor-parallel rules), step.py (the jitted step: a
  pure function (state, batch) -> (state, metrics)), accumulate.py (exact gradient accumulation);
- loop.py: `fit`, the training loop, with checkpoints (checkpoint.py, integrity.py, safetensors_state.py,
  orbax_errors.py), the run's log (runlog.py), the LiT cache of a locked tower's features (lit_cache.py) and the
  watch over the other processes of a many-host run (peers.py).

The loop and what it needs (grain, orbax) load on first use of its names: `dualenc.train.fit`.
"""

from dualenc.train.optimizer import (ClippedAdamWState, clipped_adamw, decay_mask, default_optimizer,
                                     layer_scales, learning_rate_schedule)
from dualenc.train.sharding import data_mesh, model_mesh, shard_batch, shard_state, state_sharding
from dualenc.train.state import TOWERS, TrainState, full_params, init_state, partition
from dualenc.train.step import MAX_LOGIT_SCALE, make_train_step, tower_features

_LOOP = ("Interrupted", "NonFiniteLoss", "PeerLost", "TrainConfig", "fit")

__all__ = ["ClippedAdamWState", "Interrupted", "MAX_LOGIT_SCALE", "NonFiniteLoss", "PeerLost", "TOWERS",
           "TrainConfig", "TrainState", "clipped_adamw", "data_mesh", "decay_mask", "default_optimizer", "fit",
           "full_params", "init_state", "layer_scales", "learning_rate_schedule", "make_train_step", "model_mesh",
           "partition", "shard_batch",
           "shard_state", "state_sharding", "tower_features"]


def __getattr__(name: str):
    if name in _LOOP:
        from dualenc.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'dualenc.train' has no attribute {name!r}")
