"""Contrastive training: the train state and LiT locking, the optimizer, mesh sharding, the jitted step.

The step is a pure function (state, batch) -> (state, metrics); see dualenc.train.step.
"""

from dualenc.train.optimizer import (ClippedAdamWState, clipped_adamw, decay_mask, default_optimizer,
                                     learning_rate_schedule)
from dualenc.train.sharding import data_mesh, shard_batch, shard_state, state_sharding
from dualenc.train.state import TOWERS, TrainState, full_params, init_state, partition
from dualenc.train.step import MAX_LOGIT_SCALE, make_train_step, tower_features

__all__ = ["ClippedAdamWState", "MAX_LOGIT_SCALE", "TOWERS", "TrainState", "clipped_adamw", "data_mesh",
           "decay_mask", "default_optimizer", "full_params", "init_state", "learning_rate_schedule", "make_train_step", "partition",
           "shard_batch", "shard_state", "state_sharding", "tower_features"]
