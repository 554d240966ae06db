"""The `dualenc` command."""

from __future__ import annotations

import argparse
import sys


def demo(args) -> int:
    import jax
    import numpy as np

    import dualenc

    config = dualenc.DualEncoderConfig(
        vision=dualenc.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8),
        text=dualenc.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64),
        projection_dim=32)
    params = dualenc.init(jax.random.key(args.seed), config)
    rng = np.random.default_rng(args.seed)
    input_ids = rng.integers(1, 1000, (3, 12))
    pixel_values = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = jax.jit(dualenc.apply)(params, config, input_ids=input_ids, pixel_values=pixel_values)
    print(f"dual encoder with {dualenc.num_params(params):,} params; logits_per_image (2 images x 3 texts):")
    print(np.array2string(np.asarray(out.logits_per_image), precision=4))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dualenc", description="A pure-JAX vision-text dual encoder.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="build a tiny random dual encoder and print its logits")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
