"""A training run's log: one JSON object per logged step in metrics.jsonl, and optional TensorBoard event files
(tensorboardX, the `tensorboard` extra); a resumed run continues its log, a new run starts its own.

Training records are {"kind": "train", "step", "epoch", "loss", "accuracy" (the mean of image->text and
text->image in-batch accuracy), "accuracy_i2t", "accuracy_t2i", "learning_rate", "grad_norm", "logit_scale",
"steps_per_second", "records_replaced" (records that could not be used, replaced by others since the run started
or resumed), "time"}; held-out evaluations are {"kind": "eval", "step", <metric>: value, ...}.
"""

from __future__ import annotations

import json
import math
import os
import time

from dualenc import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVENT_FILES = "events.out.tfevents."  # how tensorboardX's event file names start


class RunLog:
    """Writes records to OUT/metrics.jsonl (flushed per record) and, with tensorboard, each number as a scalar
    "<kind>/<name>" to event files in OUT/tensorboard, so that they describe one run:

    - a new run (resumed_from None) replaces what an earlier run left there: metrics.jsonl starts empty and the
      earlier event files are removed (`replaced` counts the records dropped, `replaced_events` the files);
    - a run resumed from the checkpoint at step s keeps the records up to step s and drops the later ones
      (`dropped` counts them), which it logs again as it retrains those steps; in TensorBoard the earlier
      events after step s are hidden (tensorboardX's purge_step).

    Raises:
      ImportError: tensorboard without tensorboardX installed (before any file is touched).
    """

    def __init__(self, out: str, *, tensorboard: bool = False, resumed_from: int | None = None):
        writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError("--tensorboard needs tensorboardX: pip install 'dualenc[tensorboard]'") from None
            writer = SummaryWriter
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, METRICS_FILE)
        self.replaced = self.replaced_events = self.dropped = 0
        if resumed_from is None:
            self.replaced = len(read(self.path))
            files.write_text_atomic(self.path, "")
            self.replaced_events = _remove_events(os.path.join(out, TENSORBOARD_DIR))
        else:
            self.dropped = _keep_until(self.path, resumed_from)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if writer is not None:
            self._writer = writer(os.path.join(out, TENSORBOARD_DIR),
                                  purge_step=None if resumed_from is None else resumed_from + 1)

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


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read(path: str) -> list[dict]:
    """The records of a metrics.jsonl (a line cut short by a crash is left out)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [record for record in map(_parse, f) if record is not None]


def _keep_until(path: str, step: int) -> int:
    """Rewrites metrics.jsonl (atomically) without the records after `step` and any line a crash cut short (the
    next record would be appended to it); returns how many records were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    records = [(line, _parse(line)) for line in lines if line.endswith("\n")]
    kept = [line for line, record in records if record is not None and record["step"] <= step]
    if len(kept) < len(lines):
        files.write_text_atomic(path, "".join(kept))
    return sum(1 for _, record in records if record is not None and record["step"] > step)


def _remove_events(folder: str) -> int:
    """Removes the TensorBoard event files in `folder`; returns how many there were."""
    names = [n for n in os.listdir(folder) if n.startswith(EVENT_FILES)] if os.path.isdir(folder) else []
    for name in names:
        os.unlink(os.path.join(folder, name))
    return len(names)
