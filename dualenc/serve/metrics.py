"""The service's counters and histograms, rendered in Prometheus' text exposition format (version 0.0.4)."""

from __future__ import annotations

import bisect
import collections
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Histogram:
    """Cumulative buckets, a sum and a count, per label set."""

    def __init__(self, buckets):
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple, list] = {}

    def observe(self, labels: tuple, value: float) -> None:
        counts = self.series.setdefault(labels, [[0] * (len(self.buckets) + 1), 0.0])
        counts[0][bisect.bisect_left(self.buckets, value)] += 1
        counts[1] += value

    def lines(self, name: str) -> list[str]:
        out = []
        for labels, (counts, total) in sorted(self.series.items()):
            running = 0
            for bound, n in zip(self.buckets + (float("inf"),), counts):
                running += n
                le = "+Inf" if bound == float("inf") else _number(bound)
                out.append(f"{name}_bucket{_labels(labels + (('le', le),))} {running}")
            out.append(f"{name}_sum{_labels(labels)} {_number(total)}")
            out.append(f"{name}_count{_labels(labels)} {running}")
        return out


class Metrics:
    """What /metrics shows: requests by route and status, their latency, the batches run by tower (rows asked
    for, rows run after padding), the programs compiled, and gauges read when rendered."""

    def __init__(self, batch_buckets=(1, 8, 32, 64)):
        self.lock = threading.Lock()
        self.requests = collections.Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_rows = Histogram(batch_buckets)
        self.padded_rows = collections.Counter()
        self.compiles = collections.Counter()
        self.gauges: dict[str, tuple[str, callable]] = {}

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(("route", route), ("method", method), ("status", str(status)))] += 1
            self.latency.observe((("route", route),), seconds)

    def batch(self, tower: str, rows: int, padded: int) -> None:
        with self.lock:
            self.batch_rows.observe((("tower", tower),), rows)
            self.padded_rows[(("tower", tower), ("rows", str(padded)))] += 1

    def compiled(self, tower: str) -> None:
        with self.lock:
            self.compiles[(("tower", tower),)] += 1

    def compile_count(self) -> int:
        with self.lock:
            return sum(self.compiles.values())

    def gauge(self, name: str, help_text: str, read) -> None:
        """A value read when /metrics is rendered (`read` returns a number)."""
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP dualenc_requests_total HTTP requests answered, by route, method and status.",
                     "# TYPE dualenc_requests_total counter"]
            lines += [f"dualenc_requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())]
            lines += ["# HELP dualenc_request_duration_seconds Time from a request's arrival to its response.",
                      "# TYPE dualenc_request_duration_seconds histogram"]
            lines += self.latency.lines("dualenc_request_duration_seconds")
            lines += ["# HELP dualenc_batch_rows Inputs per forward batch (before padding), by tower.",
                      "# TYPE dualenc_batch_rows histogram"]
            lines += self.batch_rows.lines("dualenc_batch_rows")
            lines += ["# HELP dualenc_batches_total Forward batches run, by tower and padded batch size.",
                      "# TYPE dualenc_batches_total counter"]
            lines += [f"dualenc_batches_total{_labels(k)} {v}" for k, v in sorted(self.padded_rows.items())]
            lines += ["# HELP dualenc_compiles_total Programs the model's towers were compiled into (new input "
                      "shapes), by tower.", "# TYPE dualenc_compiles_total counter"]
            lines += [f"dualenc_compiles_total{_labels(k)} {v}" for k, v in sorted(self.compiles.items())]
        for name, (help_text, read) in sorted(self.gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_number(read())}"]
        return "\n".join(lines) + "\n"
