"""The peers of a distributed run (dualenc.train.peers): the coordinator bound to the address given, the
heartbeat watch, work on process 0 alone. A fit() on 2 processes with one SIGKILLed: tests/test_multihost.py;
the same through `dualenc train`: tests/test_faults.py."""

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from dualenc.errors import ConfigError
from dualenc.train import peers


class Store:
    """The coordination service's key-value store, as the jaxlib client sees it."""

    def __init__(self):
        self.values, self.broken, self.lock = {}, False, threading.Lock()

    def key_value_increment(self, key, n):
        if self.broken:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        with self.lock:
            self.values[key] = str(int(self.values.get(key, 0)) + n)

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            assert allow_overwrite or key not in self.values, key
            self.values[key] = value


def _watch(store, pid, reports, processes=2, grace=0.2):
    event = threading.Event()

    def lost(error):
        assert isinstance(error, peers.PeerLost) and error.process_id == pid
        reports.append((pid, error.reason))
        event.set()

    return peers.PeerWatch(store, pid, processes, timeout=0.3, interval=0.01, on_lost=lost, grace=grace), event


def test_peer_watch_reports_a_silent_peer_or_service_and_not_a_finished_one():
    reports = []
    store = Store()
    (a, _), (b, _) = _watch(store, 0, reports), _watch(store, 1, reports)
    time.sleep(0.5)
    assert not reports  # both beat
    b.finish()
    assert store.values[b.beat_key(1)] == "done"
    time.sleep(0.6)
    assert not reports  # a finished peer is not a lost one
    a.finish()

    _, event = _watch(Store(), 0, reports)  # process 1 never beats
    assert event.wait(5) and reports.pop()[1].startswith("process 1 sent no heartbeat for"), reports
    store = Store()
    store.broken = True
    _, event = _watch(store, 1, reports)
    assert event.wait(5) and "coordination service did not answer" in reports[-1][1] and "UNAVAILABLE" in reports[-1][1]
    reports.clear()

    # Three processes, process 1 silent: process 0 finds it, process 2 learns it from process 0, and process 0
    # (whose exit takes the service down) reports only after process 2 has read it.
    store = Store()
    (_, zero), (_, two) = _watch(store, 0, reports, 3), _watch(store, 2, reports, 3)
    assert zero.wait(5) and two.wait(5)
    assert [pid for pid, _ in reports] == [2, 0], reports
    assert reports[0][1].startswith("process 1 sent no heartbeat") and reports[0][1].endswith("found by process 0")


def test_a_lost_peer_taken_by_the_main_thread_is_not_reported_again_and_process_0_leaving_is_told():
    reports = []
    watch, event = _watch(Store(), 0, reports, grace=5)  # process 1 never beats
    reason = watch.settle()  # what fit does with an error: wait for the watch's verdict, then raise PeerLost
    assert reason.startswith("process 1 sent no heartbeat") and watch.lost == reason
    assert not event.wait(0.5) and not reports  # taken: the watch does not end the process

    # Process 0 failing on its own: the others report it lost at once (not after a timeout), and it leaves only
    # once they have read it.
    store = Store()
    (zero, _), (_, told) = _watch(store, 0, reports, grace=5), _watch(store, 1, reports, grace=0.1)
    time.sleep(0.1)
    started = time.monotonic()
    zero.finish("DataError: shard 3 is corrupt")
    assert told.wait(5) and time.monotonic() - started < 2
    assert reports == [(1, "process 0 left the run: DataError: shard 3 is corrupt")]
    assert store.values.get(zero.acks + "1") == "read"


def test_the_coordinator_address_is_checked_and_a_name_that_is_loopback_here_is_found(monkeypatch):
    for bad in ("host0", "host0:", "host0:0", "host0:65536", ":1234", "host0:12a"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            peers.split_address(bad)
    assert peers.split_address("[::1]:1234") == ("::1", 1234)

    def resolve(host, port, **kw):
        found = {"node0": ["127.0.1.1"], "node1": ["10.0.0.2"], "node2": ["::1", "127.0.0.1"]}[host]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in found]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert peers.loopback_only("node0:1234") == ["127.0.1.1"]  # e.g. Debian's /etc/hosts for the host's own name
    assert peers.loopback_only("node2:1234") == ["127.0.0.1", "::1"]
    assert peers.loopback_only("node1:1234") == []
    assert peers.loopback_only("localhost:1234") == peers.loopback_only("127.0.0.1:1234") == []


COORDINATOR = textwrap.dedent("""
    import sys
    from dualenc.train import peers
    peers.initialize(sys.argv[1], 2, 0, timeout=5)  # waits for process 1, which never comes
""")


def _listening(port):
    """The local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        with open(name) as f:
            for line in f.read().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # /proc writes each 32-bit word in host (little-endian) order
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    found.append(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw))
    return found


def _other_local_address():
    """An address of this machine that is not loopback, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_coordination_service_listens_on_the_address_given_not_every_interface():
    # JAX binds [::]:PORT, whatever the coordinator address: a stranger on the network could register as a
    # process of the run (no authentication) and end it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COORDINATOR_BIND_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-c", COORDINATOR, f"127.0.0.1:{port}"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _listening(port):
            assert process.poll() is None, process.communicate()[0].decode()[-3000:]
            time.sleep(0.1)
        addresses = _listening(port)
        assert addresses and all(a in ("127.0.0.1", "::ffff:127.0.0.1") for a in addresses), addresses
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        other = _other_local_address()
        if other is not None:  # this machine's network address: refused
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=5).close()
    finally:
        process.kill()
        process.wait()


ENDED = textwrap.dedent("""
    import multiprocessing, threading, time
    from dualenc.train import peers
    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,), daemon=True)
        child.start()  # as grain's decoding workers
        print(child.pid, flush=True)
        # The watch's thread ends the process while the main thread waits where Python cannot stop it.
        threading.Thread(target=peers.end_process, args=(peers.LOST_STATUS,)).start()
        threading.Event().wait()
""")


def test_a_process_ended_for_a_lost_peer_ends_its_worker_processes_too():
    # os._exit alone left grain's workers running, holding their shared memory (and the resource tracker).
    process = subprocess.Popen([sys.executable, "-c", ENDED], stdout=subprocess.PIPE, text=True)
    child = int(process.stdout.readline())
    assert process.wait(timeout=120) == peers.LOST_STATUS
    deadline = time.time() + 10
    while time.time() < deadline and _running(child):
        time.sleep(0.05)
    running = _running(child)
    if running:
        os.kill(child, 9)
    assert not running


DECODING = textwrap.dedent("""
    import multiprocessing, sys, time
    if __name__ == "__main__":
        import dualenc
        from dualenc import data
        from dualenc.data.pipeline import PairSource, Pipeline
        data.write_vocab(sys.argv[1], list(data.DIGIT_TEMPLATES))
        processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 8, "width": 8}),
                                      dualenc.Tokenizer.from_pretrained(sys.argv[1], max_length=8))
        batches = iter(Pipeline(PairSource(data.load_digits("test", image_size=8)), processor, 4, max_length=8,
                                process_index=0, process_count=1, workers=1))
        next(batches)
        print(*[child.pid for child in multiprocessing.active_children()], flush=True)
        time.sleep(600)
""")


def test_the_decoding_workers_of_a_killed_process_end_too(tmp_path):
    # grain's workers waited for ever for a reader that was gone, holding their shared memory.
    process = subprocess.Popen([sys.executable, "-c", DECODING, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               stderr=subprocess.DEVNULL)  # (the resource tracker says what it cleans up)
    try:
        workers = [int(pid) for pid in process.stdout.readline().split()]
    finally:
        process.kill()
        process.wait()
    assert workers
    deadline = time.time() + 20
    while time.time() < deadline and any(map(_running, workers)):
        time.sleep(0.05)
    running = [pid for pid in workers if _running(pid)]
    for pid in running:
        os.kill(pid, 9)
    assert not running


def _running(pid):
    """Whether process `pid` exists and is not a zombie (its parent gone, nobody reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_only_process_0_converts_the_data_and_the_others_wait_for_it(monkeypatch):
    import jax
    from jax._src import distributed

    class Blocking:
        def __init__(self):
            self.values = {}

        def key_value_set(self, key, value):
            self.values[key] = value

        def blocking_key_value_get(self, key, timeout_ms):
            assert key in self.values and timeout_ms >= 3600_000, (key, timeout_ms)  # hours, not a collective's
            return self.values[key]

    store, ran = Blocking(), []
    monkeypatch.setattr(distributed.global_state, "client", store)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for pid in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        peers.on_process_0("prepare", lambda pid=pid: ran.append(pid))
    assert ran == [0] and store.values == {"dualenc/done/prepare": "done"}
