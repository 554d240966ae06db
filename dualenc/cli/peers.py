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

PREFIX = "dualenc/peers/"
BEATS = PREFIX + "beat/"  # BEATS + p: process p's heartbeat count (p > 0), "done" once it left the run
ZERO = PREFIX + "zero/"  # process 0's count ("beat"), and the peer it found lost ("lost")
ACKS = PREFIX + "ack/"  # ACKS + p: process p read "lost"


def jax_heartbeat_timeout(timeout: int) -> int:
    """JAX's own heartbeat timeout: long enough that the watch below always speaks first."""
    return 2 * timeout + 30


class PeerWatch:
    """Heartbeats of one process of a run, and a watch on the others'. `finish()` when this process leaves the run:
    the others then stop waiting for its heartbeats.

    A star, so that the store serves O(P) reads a second, not O(P^2): process 0 watches every count; the others
    watch process 0's, and the "lost" key process 0 posts when a count stops. Process 0 then waits (a few seconds
    at most) until the others have read it before it calls on_lost: its exit takes the coordination service down,
    and JAX's client aborts a process that loses the service before it could say why.
    """

    def __init__(self, client, process_id: int, num_processes: int, timeout: float,
                 on_lost: Callable[[str], None], interval: float = 1.0):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.timeout, self.on_lost, self.interval = timeout, on_lost, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dualenc-peer-watch", daemon=True)
        self._thread.start()

    def _beat_key(self) -> str:
        return ZERO + "beat" if self.process_id == 0 else f"{BEATS}{self.process_id}"

    def _read(self) -> dict[int, str | None]:
        """The counts this process watches; on a process other than 0, raises _Found when process 0 found one lost."""
        if self.process_id == 0:
            return {int(k[len(BEATS):]): v for k, v in self.client.key_value_dir_get(BEATS)}
        zero = dict(self.client.key_value_dir_get(ZERO))
        if ZERO + "lost" in zero:
            self.client.key_value_set(f"{ACKS}{self.process_id}", "read")
            raise _Found(f"{zero[ZERO + 'lost']}, found by process 0")
        return {0: zero.get(ZERO + "beat")}

    def _run(self) -> None:
        counts: dict[int, str | None] = {}
        watched = range(1, self.num_processes) if self.process_id == 0 else (0,)
        moved = {p: time.monotonic() for p in watched}
        while not self._stop.is_set():
            try:
                self.client.key_value_increment(self._beat_key(), 1)
                seen = self._read()
            except _Found as found:
                self._lost(str(found))
                return
            except Exception as e:  # the service (process 0) is gone, or unreachable
                self._lost(f"the coordination service did not answer: {' '.join(str(e).split())[:120]}")
                return
            now = time.monotonic()
            for peer in list(moved):
                value = seen.get(peer)
                if value == "done":
                    del moved[peer]
                elif value != counts.get(peer):
                    counts[peer], moved[peer] = value, now
                elif now - moved[peer] > self.timeout:
                    self._lost(f"process {peer} sent no heartbeat for {now - moved[peer]:.0f} s", peer, moved)
                    return
            self._stop.wait(self.interval)

    def _lost(self, reason: str, peer: int | None = None, live: dict | None = None) -> None:
        if self._stop.is_set():
            return
        if self.process_id == 0 and peer is not None:
            waiting = {p for p in live or () if p != peer}
            try:
                self.client.key_value_set(ZERO + "lost", reason)
                deadline = time.monotonic() + 2 * self.interval + 5
                while waiting and time.monotonic() < deadline:
                    waiting -= {int(k[len(ACKS):]) for k, _ in self.client.key_value_dir_get(ACKS)}
                    time.sleep(0.1)
            except Exception:  # noqa: BLE001  (the others then find the service gone: still stopped)
                pass
        self.on_lost(reason)

    def settle(self) -> None:
        """Waits out one timeout, for an error that may come from a lost peer: if one is lost, on_lost is called
        meanwhile (and ends the process); returns when none was found."""
        self._thread.join(self.timeout + 3 * self.interval)

    def finish(self) -> None:
        """Stops the watch and tells the others that this process is done (not lost)."""
        self._stop.set()
        self._thread.join()
        try:
            self.client.key_value_set(self._beat_key(), "done", allow_overwrite=True)
        except Exception:  # the run is over for this process either way; a lost service is reported by its peers
            pass


class _Found(Exception):
    """Process 0 posted a lost peer."""


def join(coordinator: str, num_processes: int, process_id: int, timeout: int,
         on_lost: Callable[[str], None]) -> PeerWatch:
    """jax.distributed.initialize (gloo collectives for CPU devices) and a PeerWatch on the other processes."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # for CPU devices; GPUs use NCCL
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=jax_heartbeat_timeout(timeout))
    return PeerWatch(_client(), process_id, num_processes, timeout, on_lost)


def _client():
    """The coordination service's client that jax.distributed.initialize made (JAX has no public accessor)."""
    from jax._src import distributed

    return distributed.global_state.client


def on_process_0(name: str, work: Callable[[], None], *, timeout_s: float = 7 * 24 * 3600) -> None:
    """Runs `work` on process 0 only (a conversion into shared storage, say); the other processes wait for it
    through the coordination service, not a collective, so the wait may last hours. A process 0 that fails never
    posts its key: the others' PeerWatch then reports it lost."""
    import jax

    if jax.process_count() == 1:
        work()
        return
    client, key = _client(), f"dualenc/done/{name}"
    if jax.process_index() == 0:
        work()
        client.key_value_set(key, "done")
    else:
        client.blocking_key_value_get(key, int(timeout_s * 1000))
