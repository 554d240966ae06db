"""Lets torchvision's Python parts import beside a CPU torch when its compiled ops do not load.

The torchvision wheel the package index serves is a CUDA build; beside the CPU torch its `_C` extension
fails to load, and importing torchvision (or anything that pulls it in: open_clip, transformers' image
processors) then dies with "operator torchvision::nms does not exist". Defining the two op schemas its meta
registrations expect fixes the import; the ops themselves (nms) stay unavailable, which no test uses.
Call `install()` before the first import of torchvision.
"""

import glob
import importlib.util
import os

_LIBRARY = None


def install() -> bool:
    """Defines torchvision::nms and ::qnms if torchvision is installed and its extension does not load.

    Returns True when the schemas were defined here (the extension could not be loaded).
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    for location in spec.submodule_search_locations:
        for lib in glob.glob(os.path.join(location, "_C*.so")) + glob.glob(os.path.join(location, "_C*.pyd")):
            try:
                torch.ops.load_library(lib)
                return False  # a working extension registers the real ops
            except (OSError, RuntimeError):
                pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor qdets, Tensor scales, Tensor zero_points, float iou_threshold) -> Tensor")
    return True
