"""Joining a distributed `dualenc train` run, noticing when a peer is gone, and work done by process 0 alone.

A peer that dies while this process waits in a collective shows up as a JaxRuntimeError from the step. One that dies
while this process waits anywhere else (orbax's commit barrier, the data pipeline) is found only by the coordination
service's heartbeats, and JAX's client then aborts the process with a native stack trace; the client takes a
callback for that case, but jaxlib cannot hand it the status (std::bad_cast), and jax.distributed.initialize does not
expose it anyway. So each process here also counts its own heartbeats in the service's key-value store, a thread
watches the others' counts, and a count that stops for `timeout` seconds (or a store that cannot be reached) calls
`on_lost` well before JAX's own, longer heartbeat timeout would abort the process.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

PREFIX = "dualenc/heartbeat/"


def jax_heartbeat_timeout(timeout: int) -> int:
    """JAX's own heartbeat timeout: long enough that the watch below always speaks first."""
    return 2 * timeout + 30


class PeerWatch:
    """Heartbeats of one process of a run, and a watch on the others'. `finish()` when this process leaves the run:
    the others then stop waiting for its heartbeats."""

    def __init__(self, client, process_id: int, num_processes: int, timeout: float,
                 on_lost: Callable[[str], None], interval: float = 1.0):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.timeout, self.on_lost, self.interval = timeout, on_lost, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dualenc-peer-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        counts: dict[int, str] = {}
        moved = {p: time.monotonic() for p in range(self.num_processes) if p != self.process_id}
        while not self._stop.is_set():
            try:
                self.client.key_value_increment(f"{PREFIX}{self.process_id}", 1)
                seen = dict(self.client.key_value_dir_get(PREFIX))
            except Exception as e:  # the service (process 0) is gone, or unreachable
                if not self._stop.is_set():
                    self.on_lost(f"the coordination service did not answer: {' '.join(str(e).split())[:120]}")
                return
            now = time.monotonic()
            for peer in list(moved):
                value = seen.get(f"{PREFIX}{peer}")
                if value == "done":
                    del moved[peer]
                elif value != counts.get(peer):
                    counts[peer], moved[peer] = value, now
                elif now - moved[peer] > self.timeout and not self._stop.is_set():
                    self.on_lost(f"process {peer} sent no heartbeat for {now - moved[peer]:.0f} s")
                    return
            self._stop.wait(self.interval)

    def settle(self) -> None:
        """Waits out one timeout, for an error that may come from a lost peer: if one is lost, on_lost is called
        meanwhile (and ends the process); returns when none was found."""
        self._thread.join(self.timeout + 3 * self.interval)

    def finish(self) -> None:
        """Stops the watch and tells the others that this process is done (not lost)."""
        self._stop.set()
        self._thread.join()
        try:
            self.client.key_value_set(f"{PREFIX}{self.process_id}", "done", allow_overwrite=True)
        except Exception:  # the run is over for this process either way; a lost service is reported by its peers
            pass


def join(coordinator: str, num_processes: int, process_id: int, timeout: int,
         on_lost: Callable[[str], None]) -> PeerWatch:
    """jax.distributed.initialize (gloo collectives for CPU devices) and a PeerWatch on the other processes."""
    import jax
    from jax._src import distributed

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # for CPU devices; GPUs use NCCL
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=jax_heartbeat_timeout(timeout))
    return PeerWatch(distributed.global_state.client, process_id, num_processes, timeout, on_lost)


def on_process_0(name: str, work: Callable[[], None], *, timeout_s: float = 7 * 24 * 3600) -> None:
    """Runs `work` on process 0 only (a conversion into shared storage, say); the other processes wait for it
    through the coordination service, not a collective, so the wait may last hours. A process 0 that fails never
    posts its key: the others' PeerWatch then reports it lost."""
    import jax

    if jax.process_count() == 1:
        work()
        return
    from jax._src import distributed

    client, key = distributed.global_state.client, f"dualenc/done/{name}"
    if jax.process_index() == 0:
        work()
        client.key_value_set(key, "done")
    else:
        client.blocking_key_value_get(key, int(timeout_s * 1000))
