"""python -m benchmarks.search [--rows 1000000] [--ann-rows 100000] [--json FILE]: embedding search latency.

Exact search (dualenc.search.index.search_exact: a matmul per chunk of the index and argpartition) at --rows random
512-dim unit vectors, read from an index file written with IndexWriter (memory-mapped, as `dualenc search`
reads it); then, at --ann-rows, approximate search with faiss (HNSW, the one dualenc builds, and IVF-flat) and
usearch (HNSW, float32 and int8), each at several search widths: build time, file size, load time, latency and
recall@10 against exact search, on two kinds of data: "random" (Gaussian, as asked: nothing for a graph or
clusters to use, the worst case) and "low-rank" (a 32-dim latent mapped to 512 dims plus noise: structure as
real embeddings have it). Queries are fresh draws of the same distribution, not rows of the index. Not part of
the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualenc.search import ann  # noqa: E402
from dualenc.search import index

DIMS = 512
LATENT = 32
K = 10
EF = (16, 32, 64, 128, 256)
NPROBE = (8, 16, 32, 64, 128)


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def draw(kind: str, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors: "random" Gaussian, or "low-rank" (LATENT-dim latent, a fixed random map, plus noise)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(12345).standard_normal((LATENT, DIMS), dtype=np.float32)
    out = np.empty((n, DIMS), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noise = rng.standard_normal((m, DIMS), dtype=np.float32)
        if kind == "random":
            out[start:start + m] = noise
        else:
            out[start:start + m] = rng.standard_normal((m, LATENT), dtype=np.float32) @ mix \
                + 0.3 * np.sqrt(LATENT) * noise
        unit(out[start:start + m])
    return out


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), exact.tolist())]))


def exact_case(rows: int, work: str, repeats: int) -> dict:
    """Exact search of a `rows`-row random index file, memory-mapped as `dualenc search` reads it."""
    path = os.path.join(work, "random.safetensors")
    start = time.perf_counter()
    with index.IndexWriter(path, DIMS, "image") as writer:
        for at in range(0, rows, 100_000):
            block = draw("random", min(100_000, rows - at), seed=at + 1)
            writer.add(block, [str(i) for i in range(at, at + len(block))])
    written = time.perf_counter() - start
    opened = index.open_index(path)
    queries = draw("random", 1000, seed=0)
    index.search_exact(opened.embeddings, queries[:1], K)  # the file in the page cache
    one = median_seconds(lambda: index.search_exact(opened.embeddings, queries[:1], K), repeats)
    batch = {q: median_seconds(lambda: index.search_exact(opened.embeddings, queries[:q], K),
                               repeats if q < 1000 else min(repeats, 3)) / q for q in (10, 100, 1000)}
    scores = queries[:1] @ np.asarray(opened.embeddings).T
    argsort = median_seconds(lambda: np.argsort(-scores[0], kind="stable")[:K], repeats)
    argpartition = median_seconds(lambda: np.argpartition(-scores[0], K - 1)[:K], repeats)
    case = {"case": f"exact search, {rows} x {DIMS} random unit vectors (memory-mapped index file)",
            "rows": rows, "write_index_seconds": round(written, 2),
            "index_file_MiB": round(os.path.getsize(path) / 2 ** 20, 1),
            "one_query_ms": round(one * 1e3, 2),
            "per_query_ms_in_batches": {str(q): round(t * 1e3, 3) for q, t in batch.items()},
            "top10_of_all_scores_ms": {"argsort (stable)": round(argsort * 1e3, 2),
                                       "argpartition": round(argpartition * 1e3, 2)}}
    os.remove(path)
    return case


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def ann_cases(kind: str, rows: int, work: str, libraries: list[str], repeats: int) -> list[dict]:
    import faiss

    data = draw(kind, rows, seed=1)
    queries = draw(kind, 1000, seed=2)
    (_, exact), exact_s = timed(lambda: index.search_exact(data, queries, K))
    one_exact = median_seconds(lambda: index.search_exact(data, queries[:1], K), repeats)
    cases = [{"data": kind, "rows": rows, "method": "exact (search_exact)", "build_seconds": 0.0,
              "widths": [{"width": None, "recall_at_10": 1.0, "per_query_ms_batch_1000": exact_s / len(queries) * 1e3,
                          "one_query_ms": one_exact * 1e3}]}]

    def measure(name, build, search, widths, save, load):
        built, build_s = timed(build)
        path = os.path.join(work, "ann.bin")
        save(built, path)
        size = os.path.getsize(path)
        loaded, load_s = timed(lambda: load(path))
        rows_ = []
        for w in widths:
            found, batch_s = timed(lambda: search(loaded, queries, w))
            one = median_seconds(lambda: search(loaded, queries[:1], w), max(repeats, 20))
            rows_.append({"width": w, "recall_at_10": recall(found, exact),
                          "per_query_ms_batch_1000": batch_s / len(queries) * 1e3,
                          "one_query_ms": one * 1e3})
        os.remove(path)
        case = {"data": kind, "rows": rows, "method": name, "build_seconds": build_s, "file_MiB": size / 2 ** 20,
                "load_seconds": load_s, "widths": rows_}
        print(json.dumps(case), flush=True)
        cases.append(case)

    if "faiss-hnsw" in libraries:
        def build_hnsw():
            graph = faiss.IndexHNSWFlat(DIMS, ann.HNSW_M, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = ann.HNSW_EF_CONSTRUCTION
            graph.add(data)
            return graph

        measure(f"faiss IndexHNSWFlat M={ann.HNSW_M} efConstruction={ann.HNSW_EF_CONSTRUCTION} "
                f"(dualenc's; width = efSearch)", build_hnsw,
                lambda g, q, w: g.search(q, K, params=faiss.SearchParametersHNSW(efSearch=w))[1], EF,
                faiss.write_index, lambda p: faiss.read_index(p, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY))
    if "faiss-ivf" in libraries:
        nlist = int(4 * np.sqrt(rows))

        def build_ivf():
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIMS), DIMS, nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.train(data[np.random.default_rng(0).choice(rows, min(rows, 50 * nlist), replace=False)])
            ivf.add(data)
            return ivf

        measure(f"faiss IndexIVFFlat nlist={nlist} (width = nprobe)", build_ivf,
                lambda g, q, w: g.search(q, K, params=faiss.SearchParametersIVF(nprobe=w))[1], NPROBE,
                faiss.write_index, faiss.read_index)
    for dtype in ("f32", "i8"):
        if f"usearch-{dtype}" not in libraries:
            continue
        from usearch.index import Index

        def build_usearch():
            graph = Index(ndim=DIMS, metric="ip", dtype=dtype, connectivity=ann.HNSW_M,
                          expansion_add=ann.HNSW_EF_CONSTRUCTION)
            graph.add(np.arange(rows), data, threads=os.cpu_count())
            return graph

        def search_usearch(graph, q, w):
            graph.expansion_search = w
            return graph.search(q, K, threads=os.cpu_count()).keys

        measure(f"usearch HNSW {dtype} connectivity={ann.HNSW_M} expansion_add={ann.HNSW_EF_CONSTRUCTION} "
                f"(width = expansion_search)", build_usearch, search_usearch, EF, lambda g, p: g.save(p),
                lambda p: Index.restore(p, view=True))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the exact-search index")
    parser.add_argument("--ann-rows", type=int, default=100_000, help="rows of the ANN comparison")
    parser.add_argument("--data", nargs="+", default=["random", "low-rank"])
    parser.add_argument("--libraries", nargs="+",
                        default=["faiss-hnsw", "faiss-ivf", "usearch-f32", "usearch-i8"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--json", default="benchmarks/results-cpu-search.json")
    args = parser.parse_args(argv)
    import faiss

    started = time.perf_counter()
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpu_count": os.cpu_count(), "numpy": np.__version__, "faiss": faiss.__version__},
               "dims": DIMS, "k": K, "cases": []}
    try:
        import usearch

        results["machine"]["usearch"] = usearch.__version__
    except ImportError:
        pass
    work = tempfile.mkdtemp(prefix="dualenc-bench-search-")
    try:
        if not args.skip_exact:
            case = exact_case(args.rows, work, args.repeats)
            print(json.dumps(case), flush=True)
            results["cases"].append(case)
        for kind in args.data:
            results["cases"] += ann_cases(kind, args.ann_rows, work, args.libraries, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    from benchmarks.common import write_results  # (jax loads with it: only now, after measuring)

    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
