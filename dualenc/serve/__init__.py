"""`dualenc serve`: an embedding, search and zero-shot service over a model and an index (Starlette on uvicorn,
the `serve` extra).

- limits.py: what a request may hold, checked before any work (ApiError names the field);
- batcher.py: requests' inputs batched per tower in a few fixed batch sizes, on every local device;
- metrics.py: counters and histograms in Prometheus' text format;
- thumbnails.py: the index's images, only under its image root;
- app.py: the routes (Service, create_app).
"""

from dualenc.serve.app import Service, create_app
from dualenc.serve.batcher import BATCH_SIZES, Batcher
from dualenc.serve.limits import ApiError, Limits

__all__ = ["BATCH_SIZES", "ApiError", "Batcher", "Limits", "Service", "create_app"]
