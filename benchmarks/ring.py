"""The contrastive losses without gathering (ring) beside the gathered forms, on 8 virtual CPU devices.

`python -m benchmarks.ring [--batch 32768] [--dim 768] [--chunk 512] [--time-batch 4096] [--time-dim 256]
[--time-chunk 128] [--repeats 5] [--json FILE]`

- memory: the value and gradients (embeddings, scale, bias) of dualenc.losses.sharded_loss, jitted over a mesh of 8
  devices with the embeddings sharded by rows, compiled for a global batch of --batch pairs x --dim (nothing is
  run); per device, XLA's memory_analysis(): temp (the program's own buffers), arguments, outputs, and temp +
  arguments. For each loss ("siglip", "clip"), form ("gather", "ring") and chunk_size (none, --chunk).
- time: the same programs run at --time-batch x --time-dim (chunks of --time-chunk), median seconds of
  --repeats runs in turns, and the ring / gathered ratio. Eight virtual devices share this machine's cores,
  so this is for information only.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.common import block, interleaved, machine, write_results  # noqa: E402
from dualenc import losses  # noqa: E402

MIB = 2 ** 20


def program(kind: str, form: str, mesh: Mesh, chunk_size: int | None):
    """jit(value_and_grad) of the global loss w.r.t. embeddings, scale (and bias)."""
    fn = losses.sharded_loss(kind, mesh, form=form, chunk_size=chunk_size)
    argnums = (0, 1, 2, 3) if kind == "siglip" else (0, 1, 2)
    return jax.jit(jax.value_and_grad(fn, argnums))


def arguments(kind: str, mesh: Mesh, batch: int, dim: int, abstract: bool):
    rows, scalar = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    count = 4 if kind == "siglip" else 3
    if abstract:
        embeds = [jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)] * 2
        return (*embeds, *[jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar)] * (count - 2))
    rng = np.random.default_rng(0)
    t, i = rng.standard_normal((2, batch, dim)).astype(np.float32)
    t, i = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (t, i))
    params = (np.float32(np.log(10.0)), np.float32(-10.0))[:count - 2]
    return (jax.device_put(t, rows), jax.device_put(i, rows), *(jax.device_put(p, scalar) for p in params))


def variants(chunk: int):
    for kind in ("siglip", "clip"):
        for form in ("gather", "ring"):
            for chunk_size in (None, chunk):
                yield kind, form, chunk_size


def memory(mesh: Mesh, batch: int, dim: int, chunk: int) -> list[dict]:
    out = []
    for kind, form, chunk_size in variants(chunk):
        compiled = program(kind, form, mesh, chunk_size).lower(*arguments(kind, mesh, batch, dim, True)).compile()
        stats = compiled.memory_analysis()
        temp, args, outs = (stats.temp_size_in_bytes, stats.argument_size_in_bytes, stats.output_size_in_bytes)
        out.append({"loss": kind, "form": form, "chunk_size": chunk_size, "temp_mib": temp / MIB,
                    "argument_mib": args / MIB, "output_mib": outs / MIB,
                    "temp_plus_argument_mib": (temp + args) / MIB})
        print(f"{kind:6s} {form:6s} chunk {str(chunk_size):5s} temp {temp / MIB:8.1f} MiB  arguments "
              f"{args / MIB:6.1f} MiB  outputs {outs / MIB:6.1f} MiB  temp + arguments {(temp + args) / MIB:8.1f} MiB")
    return out


def timing(mesh: Mesh, batch: int, dim: int, chunk: int, repeats: int) -> list[dict]:
    out = []
    for kind in ("siglip", "clip"):
        args = arguments(kind, mesh, batch, dim, False)
        fns, values = {}, {}
        for _, form, chunk_size in (v for v in variants(chunk) if v[0] == kind):
            step = program(kind, form, mesh, chunk_size)
            values[form, chunk_size] = float(step(*args)[0])
            fns[form, chunk_size] = (lambda s: lambda: block(s(*args)))(step)
        times = interleaved(fns, repeats)
        for chunk_size in (None, chunk):
            ring, gather = times["ring", chunk_size], times["gather", chunk_size]
            out.append({"loss": kind, "chunk_size": chunk_size, "gather_s": gather, "ring_s": ring,
                        "ring_over_gather": ring / gather,
                        "value_diff": abs(values["ring", chunk_size] - values["gather", chunk_size])})
            print(f"{kind:6s} chunk {str(chunk_size):5s} gather {gather * 1e3:8.1f} ms  ring {ring * 1e3:8.1f} ms  "
                  f"ring / gather {ring / gather:.2f}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--time-batch", type=int, default=4096)
    parser.add_argument("--time-dim", type=int, default=256)
    parser.add_argument("--time-chunk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    results = {"machine": machine(), "devices": len(mesh.devices.flat),
               "memory": {"batch": args.batch, "dim": args.dim, "per_device_rows": args.batch // 8,
                          "programs": memory(mesh, args.batch, args.dim, args.chunk)},
               "time": {"batch": args.time_batch, "dim": args.time_dim, "chunk": args.time_chunk,
                        "repeats": args.repeats,
                        "programs": timing(mesh, args.time_batch, args.time_dim, args.time_chunk,
                                                   args.repeats)}}
    if args.json:
        write_results(args.json, results)


if __name__ == "__main__":
    main()
