"""python -m benchmarks.sharding [--devices 4] [--hidden 256] [--layers 4] [--batch 16 128]: the CLIP train step
on virtual CPU devices, replicated, with FSDP (the rules, and the rules with attention's q/k/v split over "data"
as before issue 24) and tensor parallel on a (devices / 2) x 2 mesh with FSDP: XLA's "[SPMD] Involuntary full
rematerialization" warnings while compiling, the step's collectives (weights all-gathered, gradients reduced,
activations moved) and its memory (compiled.memory_analysis()). Nothing runs: each step is only compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

WARNING = "Involuntary full rematerialization"


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--layout", choices=("per-layer", "stacked"), default="per-layer")
    return ap.parse_args()


@contextlib.contextmanager
def stderr_into(out: list):
    """Appends what the process writes to file descriptor 2 meanwhile (XLA logs from C++) to out."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            out.append(f.read())


def main():
    args = parse()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import dualenc
    from dualenc import train
    from dualenc.train import sharding
    from dualenc.train.sharding import FSDP, SHARDED_AXES

    size = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                intermediate_size=4 * args.hidden)
    config = dualenc.DualEncoderConfig(
        vision=dualenc.CLIPVisionConfig(**size, image_size=32, patch_size=8),
        text=dualenc.CLIPTextConfig(**size, vocab_size=1000, max_position_embeddings=16), projection_dim=64,
        model_type="clip")
    params = dualenc.init(jax.random.key(0), config)
    optimizer = train.default_optimizer(1e-3, total_steps=10)
    state = train.init_state(params, optimizer, layer_loop=args.layout == "per-layer")
    data = sharding.data_mesh()
    variants = [("replicated", data, False), ("fsdp", data, FSDP(min_shard_mb=0)),
                ("fsdp, qkv split (before)", data, FSDP(min_shard_mb=0, axes=SHARDED_AXES | {"qkv"})),
                (f"tp {args.devices // 2}x2 + fsdp", sharding.model_mesh(args.devices // 2, 2), FSDP(min_shard_mb=0))]
    print(f"CLIP, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, {args.layout} params, "
          f"{args.devices} devices, jax {jax.__version__}")
    print("| batch | variant | remat warnings | weight all-gathers | gradient reductions | activation collectives "
          "| all-to-all | state MiB / device | temp MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for rows in args.batch:
        rng = np.random.default_rng(0)
        batch = dict(input_ids=rng.integers(1, 999, (rows, 16)).astype(np.int32),
                     attention_mask=np.ones((rows, 16), np.int32),
                     pixel_values=rng.standard_normal((rows, 3, 32, 32)).astype(np.float32))
        for name, mesh, fsdp in variants:
            specs = train.state_sharding(state, mesh, fsdp)
            shapes = set()  # each weight's shape, whole and as tensor parallelism leaves it on a device
            for x, s in zip(jax.tree_util.tree_leaves(state.trainable), jax.tree_util.tree_leaves(specs.trainable)):
                local = [d // (2 if "model" in (s.spec[i:i + 1] or (None,)) else 1) for i, d in enumerate(np.shape(x))]
                shapes |= {tuple(sorted(d for d in shape if d != 1)) for shape in (np.shape(x), local)}
            abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                              state, specs)
            placed = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P("data")))
                      for k, v in batch.items()}
            step = train.make_train_step(config, optimizer, mesh=mesh, fsdp=fsdp)
            logged = []
            jax.config.update("jax_enable_compilation_cache", False)
            with stderr_into(logged):
                compiled = step.lower(abstract, placed).compile()
            count = {"all-gather": 0, "reduce": 0, "activation": 0, "all-to-all": 0}
            for op, out in sharding.collectives(compiled.as_text()):
                for shape in out:
                    canonical = tuple(sorted(d for d in shape if d != 1))
                    if op == "collective-permute" or not canonical:
                        continue  # the ring loss's blocks; scalars (norms, the loss)
                    if op == "all-to-all":
                        count["all-to-all"] += 1
                    elif canonical in shapes:
                        count["all-gather" if op == "all-gather" else "reduce"] += 1
                    elif not set(canonical) <= {rows, rows // mesh.shape["data"], config.projection_dim}:
                        count["activation"] += 1
            memory = compiled.memory_analysis()
            print(f"| {rows} | {name} | {logged[0].count(WARNING)} | {count['all-gather']} | {count['reduce']} | "
                  f"{count['activation']} | {count['all-to-all']} | {memory.argument_size_in_bytes / 2 ** 20:.1f} | "
                  f"{memory.temp_size_in_bytes / 2 ** 20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
