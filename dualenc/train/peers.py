"""The peers of a distributed training run: joining one, noticing when a peer is gone, work done by process 0 alone.

A peer that dies while this process waits in a collective shows up as a JaxRuntimeError (gloo, CPU devices) or as
a collective that never returns (NCCL). One that dies while this process waits anywhere else (orbax's commit
barrier, the data pipeline) is found only by the coordination service's heartbeats, and JAX's client then aborts
the process with a native stack trace; the client takes a callback for that case, but jaxlib cannot hand it the
status (std::bad_cast), and jax.distributed.initialize does not expose it anyway. So each process here also counts
its own heartbeats in the service's key-value store, a thread watches the others' counts (PeerWatch), and a count
that stops for `timeout` seconds (or a store that cannot be reached) is a lost peer, found well before JAX's own
heartbeat timeout would abort the process. dualenc.train.loop.fit starts a watch itself and raises PeerLost.

A process that lost a peer can neither use JAX's distributed runtime again nor leave it cleanly: JAX's shutdown
at exit waits for every process, the lost one too, then aborts. So such a process ends with exit status
LOST_STATUS, without that shutdown (end_process).

The coordination service has no authentication: whoever reaches its port can register as a process of the run
and end it. initialize() binds it to the coordinator address given (loopback only for localhost or 127.0.0.1),
where JAX binds every interface; the port must be reachable by the training hosts only.
"""

from __future__ import annotations

import atexit
import ipaddress
import multiprocessing
import os
import socket
import sys
import threading
import time
from typing import Callable

from dualenc.errors import ConfigError

PREFIX = "dualenc/peers/"  # PREFIX + "N/": the keys of this process's N-th watch (the same N on every process)
LOST_STATUS = 3  # the exit status of a process that lost a peer
START_TIMEOUT = 1800  # seconds within which every process must start its watch (reach fit)
_started: list[PeerWatch] = []  # this process's watches, oldest first


class PeerLost(RuntimeError):
    """A peer of this process's distributed run is gone: killed, crashed, unreachable, silent for the watch's
    timeout, or left the run with an error. The process ends with exit status LOST_STATUS when it exits (JAX's
    distributed shutdown would wait for the lost peer, then abort).

    Attributes:
      process_id: this process.
      reason: what was found, e.g. "process 1 sent no heartbeat for 30 s".
      step: the last step this process completed (in fit), or None.
      checkpoint: the newest complete training checkpoint (in fit with a checkpoint_dir), or None.
    """

    def __init__(self, process_id: int, reason: str, step: int | None = None, checkpoint: str | None = None):
        where = "" if step is None else f" after step {step}"
        saved = "" if step is None else f"; last checkpoint: {checkpoint or 'none'}"
        super().__init__(f"process {process_id} lost a peer of the distributed run{where} ({reason}){saved}")
        self.process_id, self.reason, self.step, self.checkpoint = process_id, reason, step, checkpoint


def jax_heartbeat_timeout(timeout: float) -> int:
    """JAX's own heartbeat timeout: long enough that the watch always speaks first."""
    return int(2 * timeout + 30)


class PeerWatch:
    """Heartbeats of one process of a run, and a watch on the others'.

    A star, so that the store serves O(P) reads a second, not O(P^2): process 0 watches every count; the others
    watch process 0's, and the "lost" key process 0 posts when a count stops. Process 0 then waits (a few seconds
    at most) until the others have read it before it reports: its exit takes the coordination service down, and
    JAX's client aborts a process that loses the service before it could say why.

    A lost peer is reported to this process's main thread, which takes it with settle() (fit raises PeerLost);
    when none did within `grace` seconds (the main thread waits where Python cannot interrupt it: a collective
    that never returns, a barrier), the watch calls on_lost(PeerLost), which must end the process.
    """

    def __init__(self, client, process_id: int, num_processes: int, timeout: float,
                 on_lost: Callable[[PeerLost], None], interval: float = 1.0, namespace: str = PREFIX + "0/",
                 grace: float | None = None):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.timeout, self.on_lost, self.interval = timeout, on_lost, interval
        self.grace = 2 * interval + 5 if grace is None else grace
        self.beats, self.zero, self.acks = namespace + "beat/", namespace + "zero/", namespace + "ack/"
        self.lost: str | None = None  # the reason, once a peer is found lost
        self.where: Callable[[], tuple[int | None, str | None]] = lambda: (None, None)  # (step, checkpoint)
        self._live: set[int] = set()
        self._stop, self._found, self._taken = threading.Event(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="dualenc-peer-watch", daemon=True)
        self._thread.start()

    def beat_key(self, process_id: int) -> str:
        """Where process `process_id` counts its heartbeats ("done" once it left the run)."""
        return self.zero + "beat" if process_id == 0 else f"{self.beats}{process_id}"

    def _read(self) -> dict[int, str | None]:
        """The counts this process watches; on a process other than 0, raises _Found when process 0 posted a lost
        peer."""
        if self.process_id == 0:
            return {int(k[len(self.beats):]): v for k, v in self.client.key_value_dir_get(self.beats)}
        zero = dict(self.client.key_value_dir_get(self.zero))
        if self.zero + "lost" in zero:
            self.client.key_value_set(f"{self.acks}{self.process_id}", "read")
            raise _Found(zero[self.zero + "lost"])
        return {0: zero.get(self.zero + "beat")}

    def _run(self) -> None:
        counts: dict[int, str | None] = {}
        watched = range(1, self.num_processes) if self.process_id == 0 else (0,)
        moved = {p: time.monotonic() for p in watched}
        self._live = set(moved)
        while not self._stop.is_set():
            try:
                self.client.key_value_increment(self.beat_key(self.process_id), 1)
                seen = self._read()
            except _Found as found:
                self._report(str(found))
                return
            except Exception as e:  # the service (process 0) is gone, or unreachable
                self._report(f"the coordination service did not answer: {' '.join(str(e).split())[:120]}")
                return
            now = time.monotonic()
            for peer in list(moved):
                value = seen.get(peer)
                if value == "done":
                    del moved[peer]
                    self._live.discard(peer)
                elif value != counts.get(peer):
                    counts[peer], moved[peer] = value, now
                elif now - moved[peer] > self.timeout:
                    self._live.discard(peer)
                    self._report(f"process {peer} sent no heartbeat for {now - moved[peer]:.0f} s", found=True)
                    return
            self._stop.wait(self.interval)

    def _announce(self, reason: str) -> None:
        """Process 0: posts `reason` for the others and waits (a few seconds at most) until they have read it."""
        try:
            self.client.key_value_set(self.zero + "lost", reason)
            waiting, deadline = set(self._live), time.monotonic() + 2 * self.interval + 5
            while waiting and time.monotonic() < deadline:
                waiting -= {int(k[len(self.acks):]) for k, _ in self.client.key_value_dir_get(self.acks)}
                time.sleep(0.1)
        except Exception:  # noqa: BLE001  (the others then find the service gone: still stopped)
            pass

    def _report(self, reason: str, found: bool = False) -> None:
        if self._stop.is_set():
            return
        if self.process_id == 0 and found:
            self._announce(f"{reason}, found by process 0")
        self.lost = reason
        self._found.set()
        if not self._taken.wait(self.grace):
            self.on_lost(PeerLost(self.process_id, reason, *self.where()))

    def settle(self) -> str | None:
        """For an error that may come from a lost peer: waits (one timeout at most) until the watch finds one lost
        and returns the reason, which the caller then reports (the watch no longer ends the process); None when
        none was found."""
        if self._thread.is_alive():
            self._found.wait(self.timeout + 3 * self.interval + 5)
        if self.lost is not None:
            self._taken.set()
        return self.lost

    def finish(self, error: str | None = None) -> None:
        """Stops the watch. Without `error`, tells the others that this process is done (not lost). With it (this
        process leaves the run with an error), process 0 tells the others, which report it lost, and returns once
        they have read it (its exit takes the coordination service down); another process just stops its
        heartbeats, and process 0 finds it lost."""
        self._stop.set()
        if not self._found.is_set():
            self._thread.join()
        if self.lost is not None:
            return
        try:
            if error is None:
                self.client.key_value_set(self.beat_key(self.process_id), "done", allow_overwrite=True)
            elif self.process_id == 0:
                self._announce(f"process 0 left the run: {' '.join(error.split())[:200]}")
        except Exception:  # the run is over for this process either way; a lost service is reported by its peers
            pass

    @property
    def running(self) -> bool:
        return not self._stop.is_set()


class _Found(Exception):
    """Process 0 posted a lost peer."""


def _client():
    """The coordination service's client that jax.distributed.initialize made, or None (JAX has no public
    accessor)."""
    from jax._src import distributed

    return distributed.global_state.client


def running() -> PeerWatch | None:
    """This process's watch, while one runs (started by initialize() or fit)."""
    return _started[-1] if _started and _started[-1].running else None


def start(timeout: float = 30.0, on_lost: Callable[[PeerLost], None] | None = None,
          interval: float = 1.0) -> PeerWatch | None:
    """Starts this process's PeerWatch: None without jax.distributed or with one process. Every process of the run
    calls it (they wait for each other, up to START_TIMEOUT, so that their clocks start together).

    on_lost: called with PeerLost (from the watch's thread) when no main thread took a lost peer; it must end the
      process. Default: one line on stderr, then end_process(LOST_STATUS).
    """
    import jax

    client = _client()
    if client is None or jax.process_count() == 1:
        return None
    namespace = f"{PREFIX}{len(_started)}/"
    try:
        client.wait_at_barrier(namespace + "start", START_TIMEOUT * 1000)
    except Exception as e:  # noqa: BLE001  (a barrier that timed out, or a service that is gone)
        raise PeerLost(jax.process_index(), f"the processes did not all start watching each other within "
                                            f"{START_TIMEOUT} s: {' '.join(str(e).split())[:160]}") from e
    watch = PeerWatch(client, jax.process_index(), jax.process_count(), timeout, on_lost or _end_on_lost, interval,
                      namespace)
    if not _started:
        atexit.register(_at_exit)  # after JAX's own (registered when jax was imported), so it runs before it
    _started.append(watch)
    return watch


def _end_on_lost(lost: PeerLost) -> None:
    print(f"dualenc: error: {lost}; ending the process (exit status {LOST_STATUS}): it waits where Python cannot "
          f"stop it", file=sys.stderr, flush=True)
    end_process(LOST_STATUS)


def end_process(status: int) -> None:
    """Ends this process at once (os._exit), without JAX's distributed shutdown, which waits for every process,
    a lost one too: stdout and stderr flushed and multiprocessing's daemon children (grain's decoding workers)
    terminated first, as a normal exit would (else they outlive it, holding their shared memory)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (a closed or broken stream: nothing more to say there)
            pass
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.terminate()
    for child in children:
        child.join(1)
    os._exit(status)


def _at_exit() -> None:
    if any(watch.lost is not None for watch in _started):
        end_process(LOST_STATUS)
    watch = running()
    if watch is not None:  # one initialize() started: an uncaught exception ends this process's part in the run
        error = getattr(sys, "last_value", None)
        watch.finish(None if error is None else f"{type(error).__name__}: {error}")


class FitWatch:
    """The watch over one fit() call: the running one (initialize()'s), or one it starts and finishes."""

    def __init__(self, timeout: float):
        current = running()
        self.watch = current or start(timeout)
        self.owned = current is None and self.watch is not None

    def guard(self, step: Callable[[], int], checkpoint_dir: str | None):
        """A context manager around fit's loop: an error there that comes from a lost peer (the watch finds one
        within its timeout) becomes PeerLost; an owned watch is finished on the way out."""
        return _Guard(self, step, checkpoint_dir)


class _Guard:
    def __init__(self, fit: FitWatch, step: Callable[[], int], checkpoint_dir: str | None):
        self.fit, self.step, self.checkpoint_dir = fit, step, checkpoint_dir

    def where(self) -> tuple[int, str | None]:
        from dualenc.train.checkpoint import checkpoints

        saved = checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []
        return self.step(), saved[-1][1] if saved else None

    def __enter__(self):
        if self.fit.watch is not None:
            self.fit.watch.where = self.where
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        watch = self.fit.watch
        if watch is None:
            return False
        from dualenc.errors import DualEncError

        # A lost peer shows up as any error but dualenc's own (bad input, the same on every process).
        lost = watch.settle() if isinstance(error, Exception) and not isinstance(error, DualEncError) else None
        if self.fit.owned:
            watch.finish(None if kind is None else f"{kind.__name__}: {error}")
        if lost is not None:
            raise PeerLost(watch.process_id, lost, *self.where()) from error
        return False


def split_address(coordinator: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT" ("[IPv6]:PORT" too); ConfigError otherwise."""
    host, _, port = coordinator.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"the coordinator must be HOST:PORT (a port from 1 to 65535), got {coordinator!r}")
    return host, int(port)


def loopback_only(coordinator: str) -> list[str]:
    """The addresses the coordinator's host name resolves to here when all are loopback addresses while the name
    does not say so (a host name mapped to 127.0.1.1, say): processes on other hosts could not join a service bound
    there. Empty otherwise."""
    host, port = split_address(coordinator)
    if host == "localhost" or _is_ip(host):
        return []
    try:
        found = sorted({info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})
    except OSError:
        return []
    return found if found and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found) else []


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def initialize(coordinator: str, num_processes: int, process_id: int, *, timeout: float = 30.0,
               on_lost: Callable[[PeerLost], None] | None = None) -> PeerWatch | None:
    """Joins a distributed run: jax.distributed.initialize with the coordination service (on process 0) bound to
    `coordinator` itself, HOST:PORT (loopback only for localhost or 127.0.0.1; JAX_COORDINATOR_BIND_ADDRESS, when
    set, chooses another), not every interface as JAX would; gloo collectives for CPU devices; JAX's own heartbeat
    timeout longer than the watch's. Then this process's PeerWatch (see start()), which fit() uses.

    The service has no authentication: keep the port reachable by the training hosts only (a firewall, a private
    network).
    """
    import jax

    split_address(coordinator)
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or coordinator
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # for CPU devices; GPUs use NCCL
    jax.distributed.initialize(coordinator, num_processes, process_id, coordinator_bind_address=bind,
                               heartbeat_timeout_seconds=jax_heartbeat_timeout(timeout))
    return start(timeout, on_lost)


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
