"""A training run's log: one JSON object per logged step in metrics.jsonl, appended across resumes, and
optional TensorBoard event files (tensorboardX, the `tensorboard` extra).

Training records are {"kind": "train", "step", "epoch", "loss", "accuracy" (the mean of image->text and
text->image in-batch accuracy), "accuracy_i2t", "accuracy_t2i", "learning_rate", "grad_norm", "logit_scale",
"steps_per_second", "time"}; held-out evaluations are {"kind": "eval", "step", <metric>: value, ...}.
"""

from __future__ import annotations

import json
import math
import os
import time

METRICS_FILE = "metrics.jsonl"


class RunLog:
    """Appends records to OUT/metrics.jsonl (flushed per record) and, with tensorboard, writes each number as
    a scalar "<kind>/<name>" to event files in OUT/tensorboard."""

    def __init__(self, out: str, *, tensorboard: bool = False):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, METRICS_FILE)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                self.close()
                raise ImportError("--tensorboard needs tensorboardX: pip install 'dualenc[tensorboard]'") from None
            self._writer = SummaryWriter(os.path.join(out, "tensorboard"))

    def write(self, record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}
        self._file.write(json.dumps(record, sort_keys=True, allow_nan=True) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name not in ("kind", "step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{record['kind']}/{name}", value, record["step"])
            self._writer.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read(path: str) -> list[dict]:
    """The records of a metrics.jsonl (a line cut short by a crash is left out)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records
