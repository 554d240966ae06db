"""Checkpoints by source, and the models a run starts from.

- transformers.py: transformers directories (VisionTextDualEncoder, CLIP, SigLIP, single towers), read strictly
  through each family's key table and written atomically (`save_pretrained`, `from_vision_text_pretrained`);
- open_clip.py: open_clip's hub layout, converted to transformers' names;
- big_vision.py: big_vision's SigLIP and SigLIP 2 `.npz` files (`load_big_vision`);
- weights.py: a directory's tensors read strictly, loaded through a key table;
- configs.py: config.json (or a Hub id's) as a config (`load_config`);
- pretrained.py: `load_pretrained`, which picks the reader from a directory's files;
- assembly.py: `start_from`, the model and processor a training run starts from.
"""

from dualenc.formats.assembly import check_start, start_from
from dualenc.formats.big_vision import load_big_vision
from dualenc.formats.configs import load_config
from dualenc.formats.pretrained import load_pretrained
from dualenc.formats.transformers import (
    NewlyInitializedWarning, UnusedWeightsWarning, from_vision_text_pretrained, save_pretrained,
)

__all__ = ["NewlyInitializedWarning", "UnusedWeightsWarning", "check_start", "from_vision_text_pretrained",
           "load_big_vision", "load_config", "load_pretrained", "save_pretrained", "start_from"]
