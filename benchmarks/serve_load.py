"""Under load: `dualenc serve` on loopback, 32 concurrent clients, a few thousand mixed requests (text and image
embeddings, text and image search), with batching on and off; errors, p50 / p99 latency, requests/s, compiles,
the mean rows per forward batch and the server's peak RSS. Not a test.

    python -m benchmarks.serve_load --demo .        # the folder `dualenc demo` ran in (else it runs in a temp one)
    python -m benchmarks.serve_load --demo . --big  # and a ViT-B/32-sized random model
    python -m benchmarks.serve_load --demo . --httptools-path DIR  # and the demo with httptools in DIR
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
KINDS = ("text embedding", "image embedding", "text search", "image search")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system, all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def demo_folder(path: str | None) -> str:
    """A folder holding dualenc-demo/ (model, data); made with `dualenc demo` when not given."""
    if path:
        return os.path.abspath(path)
    folder = tempfile.mkdtemp(prefix="dualenc-serve-load-")
    subprocess.run([sys.executable, "-m", "dualenc.cli", "demo", "--out", os.path.join(folder, "dualenc-demo")],
                   check=True, capture_output=True)
    return folder


def write_index(model_dir: str, images: list[str], root: str, out: str, embed: bool) -> None:
    """An index of the images (names relative to root): their embeddings by the model, or (embed False: a model
    too slow to embed them here) random unit rows of its width, served with --any-model."""
    import dualenc
    from dualenc.search import index as search_index

    config, params = dualenc.load_pretrained(model_dir)
    processor = dualenc.Processor.from_pretrained(model_dir)
    if embed:
        rows = dualenc.encode_images(params, config, processor, images, batch_size=128, progress=False)
    else:
        rows = np.random.default_rng(0).standard_normal((len(images), config.projection_dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    with search_index.IndexWriter(out, config.projection_dim, "image",
                                  {"model_sha256": search_index.model_fingerprint(params)}) as writer:
        writer.add(rows, [os.path.relpath(p, root) for p in images])


def big_model(vocab_dir: str, out: str) -> str:
    """A random dual encoder of ViT-B/32's size (768 wide, 12 layers, 224 px, patch 32) with a 512-wide,
    12-layer text tower (CLIP ViT-B/32's), on the demo's vocabulary; saved to out."""
    import jax

    import dualenc

    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 224, "width": 224}),
                                  dualenc.Tokenizer.from_pretrained(vocab_dir, max_length=16))
    config = dualenc.DualEncoderConfig(
        vision=dualenc.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, image_size=224, patch_size=32),
        text=dualenc.BertConfig(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                                intermediate_size=2048, vocab_size=processor.tokenizer.vocab_size,
                                max_position_embeddings=16), projection_dim=512)
    dualenc.save_pretrained(out, config, dualenc.init(jax.random.key(0), config), processor=processor)
    return out


class Client(threading.Thread):
    """One client: a keep-alive connection sending its share of the requests one after another."""

    def __init__(self, port: int, requests: list[tuple[int, str, bytes]]):
        super().__init__(daemon=True)
        self.port, self.requests = port, requests
        self.latency: list[tuple[int, float]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        for kind, path, body in self.requests:
            start = time.perf_counter()
            try:
                connection.request("POST", path, body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200:
                    self.errors.append(f"{response.status} {answer[:200]!r}")
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(repr(e))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.latency.append((kind, time.perf_counter() - start))
        connection.close()


def bodies(n: int, images: list[str]) -> list[tuple[int, str, bytes]]:
    urls = ["data:image/png;base64," + base64.b64encode(open(p, "rb").read()).decode() for p in images[:64]]
    out = []
    for i in range(n):
        kind, word, url = i % 4, WORDS[i % 10], urls[i % len(urls)]
        if kind == 0:
            path, body = "/v1/embeddings", {"input": f"a photo of the digit {word}"}
        elif kind == 1:
            path, body = "/v1/embeddings", {"input": [{"image": url}]}
        elif kind == 2:
            path, body = "/v1/search", {"query": f"a drawing of the number {word}", "top_k": 10}
        else:
            path, body = "/v1/search", {"query": {"image": url}, "top_k": 10}
        out.append((kind, path, json.dumps(body).encode()))
    return out


def blast(port: int, requests: list, clients: int) -> dict:
    workers = [Client(port, requests[k::clients]) for k in range(clients)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    latency = [(k, t) for w in workers for k, t in w.latency]
    errors = [e for w in workers for e in w.errors]
    every = np.asarray([t for _, t in latency])
    by_kind = {KINDS[k]: {"p50_ms": round(1000 * float(np.percentile([t for j, t in latency if j == k], 50)), 1),
                          "p99_ms": round(1000 * float(np.percentile([t for j, t in latency if j == k], 99)), 1)}
               for k in range(len(KINDS))}
    return {"requests": len(latency), "errors": len(errors), "first_errors": errors[:3], "seconds": round(wall, 2),
            "requests_per_s": round(len(latency) / wall, 1),
            "p50_ms": round(1000 * float(np.percentile(every, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(every, 99)), 1), "by_kind": by_kind}


def scrape(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()

    def total(pattern):
        return sum(float(m) for m in re.findall(pattern + r"\S* (\S+)$", text, re.M))

    out = {"compiles": int(total(r"^dualenc_compiles_total\{"))}
    for tower in ("text", "image"):
        batches = total(rf'^dualenc_batch_rows_count\{{tower="{tower}"\}}')
        rows = total(rf'^dualenc_batch_rows_sum\{{tower="{tower}"\}}')
        out[f"{tower}_rows_per_batch"] = round(rows / batches, 2) if batches else None
    return out


def serve(model: str, index: str, root: str, batching: bool, requests: list, warmup: list, clients: int,
          pythonpath: str | None = None) -> dict:
    port = free_port()
    args = [sys.executable, "-m", "dualenc.cli", "serve", "--model", model, "--index", index, "--images", root,
            "--port", str(port), "--log-level", "warning", "--timeout", "120"]
    if not batching:
        args.append("--no-batching")
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as `dualenc serve` in a user's shell
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(0.2)
        blast(port, warmup, clients)  # compiles every batch size the mix reaches
        before, server_cpu, client_cpu = scrape(port), cpu_seconds(proc.pid), time.process_time()
        result = blast(port, requests, clients)
        server_cpu, client_cpu = cpu_seconds(proc.pid) - server_cpu, time.process_time() - client_cpu
        after = scrape(port)
        result.update(batching=batching, clients=clients, compiles_total=after["compiles"],
                      compiles_while_measured=after["compiles"] - before["compiles"],
                      text_rows_per_batch=after["text_rows_per_batch"],
                      image_rows_per_batch=after["image_rows_per_batch"],
                      server_peak_rss_MiB=round(peak_rss_mib(proc.pid), 1),
                      server_cpu_ms_per_request=round(1000 * server_cpu / result["requests"], 3),
                      client_cpu_ms_per_request=round(1000 * client_cpu / result["requests"], 3))
        return result
    finally:
        proc.terminate()
        proc.wait(60)


def run_model(name: str, model: str, index: str, root: str, images: list, n: int, clients: int,
              pythonpath: str | None = None) -> list[dict]:
    requests, warmup = bodies(n, images), bodies(max(4 * clients, n // 10), images[::-1])
    http = "h11"
    if pythonpath:
        http = "httptools" if os.path.isdir(os.path.join(pythonpath, "httptools")) else pythonpath
    out = []
    for batching in (True, False):
        result = {"model": name, "http": http, **serve(model, index, root, batching, requests, warmup, clients,
                                                       pythonpath)}
        print(json.dumps(result), flush=True)
        out.append(result)
    out.append({"model": name, "http": http,
                "speedup_batching": round(out[0]["requests_per_s"] / out[1]["requests_per_s"], 2)})
    print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", help="a folder holding dualenc-demo/ (default: run `dualenc demo` into a temp one)")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--big", action="store_true", help="also a ViT-B/32-sized random model")
    parser.add_argument("--big-requests", type=int, default=800)
    parser.add_argument("--skip-demo", action="store_true", help="only the big model")
    parser.add_argument("--httptools-path", metavar="DIR", help="also the demo with the server's PYTHONPATH starting "
                                                                 "at DIR (`pip install --target DIR httptools`: "
                                                                 "uvicorn then parses HTTP with httptools, not h11)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results-cpu-serve-load.json"))
    args = parser.parse_args(argv)
    folder = demo_folder(args.demo)
    demo = os.path.join(folder, "dualenc-demo")
    root = os.path.join(demo, "data")
    test = os.path.join(root, "images", "test")
    images = [os.path.join(test, f) for f in sorted(os.listdir(test))]
    work = tempfile.mkdtemp(prefix="dualenc-serve-load-")
    results = []
    if not args.skip_demo:
        index = os.path.join(work, "digits.safetensors")
        write_index(os.path.join(demo, "model"), images, root, index, embed=True)
        results += run_model("demo", os.path.join(demo, "model"), index, root, images, args.requests, args.clients)
        if args.httptools_path:
            results += run_model("demo", os.path.join(demo, "model"), index, root, images, args.requests,
                                 args.clients, os.path.abspath(args.httptools_path))
    if args.big:
        model = big_model(os.path.join(demo, "vocab"), os.path.join(work, "big"))
        index = os.path.join(work, "big.safetensors")
        write_index(model, images, root, index, embed=False)
        results += run_model("vit-b32-sized", model, index, root, images, args.big_requests, args.clients)
    from benchmarks.common import machine, write_results

    write_results(args.out, {"machine": machine(), "results": results})


if __name__ == "__main__":
    main()
