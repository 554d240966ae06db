"""`dualenc train`'s options for training at scale: precision, sharding, remat, the optimizer's settings,
exact gradient accumulation and patch dropout; their checks, and the TrainConfig fields they set."""

from __future__ import annotations

import math

from dualenc.cli.options import precision_option
from dualenc.cli.support import CommandError, at_least

REMAT_EXAMPLES = "nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable"


def register(p) -> None:
    """Adds the options to the train subcommand's parser, in their own group."""
    g = p.add_argument_group("training at scale")
    precision_option(g)
    g.add_argument("--fsdp", action="store_true",
                   help="shard params and optimizer state over the devices (FSDP), not only the batch")
    g.add_argument("--remat", metavar="POLICY",
                   help=f"recompute each encoder layer's activations in the backward pass, keeping what the "
                        f"jax.checkpoint_policies POLICY saves (e.g. {REMAT_EXAMPLES})")
    g.add_argument("--accum-steps", type=int, default=1,
                   help="split each batch into this many micro-batches, one in memory at a time, with the exact "
                        "gradient of the whole batch (every pair still sees all the batch's negatives)")
    g.add_argument("--patch-dropout", type=float, default=0.0,
                   help="share of the image patches dropped at random in training (FLIP; 0.5 halves the vision "
                        "tower's work); evaluation and the saved model use every patch")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW's decoupled weight decay, on kernels and embedding tables only")
    g.add_argument("--warmup", type=int, default=None,
                   help="steps of linear warmup (none: 5%% of --steps)")
    g.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (0: no clipping)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW's first-moment decay")
    g.add_argument("--beta2", type=float, default=0.98, help="AdamW's second-moment decay")
    g.add_argument("--eps", type=float, default=1e-6, help="AdamW's epsilon")


def check(args) -> None:
    """The options' values, before any work (CommandError naming the option)."""
    at_least(args.accum_steps, "--accum-steps", 1)
    if args.warmup is not None:
        at_least(args.warmup, "--warmup", 0)
    if args.accum_steps > 1 and args.batch_size % args.accum_steps:
        raise CommandError(f"--batch-size {args.batch_size} does not split into --accum-steps {args.accum_steps} "
                           f"equal micro-batches: give a multiple of {args.accum_steps}")
    if not 0 <= args.patch_dropout < 1:
        raise CommandError(f"--patch-dropout must be a share in [0, 1), got {args.patch_dropout}")
    if args.patch_dropout and args.cache:
        raise CommandError("--patch-dropout with --cache: the cached vision features are computed once from every "
                           "patch; drop --cache to drop patches")
    for flag, value in (("--weight-decay", args.weight_decay), ("--grad-clip", args.grad_clip)):
        if not (math.isfinite(value) and value >= 0):
            raise CommandError(f"{flag} must be a number of at least 0, got {value}")
    for flag, value in (("--beta1", args.beta1), ("--beta2", args.beta2)):
        if not 0 <= value < 1:
            raise CommandError(f"{flag} must be in [0, 1), got {value}")
    if not (math.isfinite(args.eps) and args.eps > 0):
        raise CommandError(f"--eps must be a positive number, got {args.eps}")
    if args.remat is not None:
        import jax

        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_")
                       and n.islower() and callable(getattr(jax.checkpoint_policies, n)))
        if args.remat not in names:
            raise CommandError(f"--remat {args.remat!r} is not a policy in jax.checkpoint_policies; try "
                               f"{REMAT_EXAMPLES} (all: {', '.join(names)})")


def settings(args) -> dict:
    """The TrainConfig fields the options set."""
    return dict(dtype=None if args.precision == "float32" else args.precision, fsdp=args.fsdp,
                remat_policy=args.remat, accum_steps=args.accum_steps, patch_dropout=args.patch_dropout,
                weight_decay=args.weight_decay, warmup_steps=args.warmup, grad_clip=args.grad_clip or None,
                beta1=args.beta1, beta2=args.beta2, eps=args.eps)


def described(run) -> str:
    """One line of the start summary: what the run does beyond the plain float32 step."""
    parts = [f"precision {run.dtype or 'float32'}"]
    if run.accum_steps > 1:
        parts.append(f"{run.accum_steps} micro-batches of {run.batch_size // run.accum_steps} per step (exact "
                     f"gradient)")
    if run.patch_dropout:
        parts.append(f"patch dropout {run.patch_dropout:g}")
    if run.fsdp:
        parts.append("FSDP")
    if run.remat_policy:
        parts.append(f"remat {run.remat_policy}")
    parts.append(f"AdamW (betas {run.beta1:g}, {run.beta2:g}; eps {run.eps:g}; weight decay {run.weight_decay:g}; "
                 f"gradient clip {run.grad_clip if run.grad_clip else 'none'})")
    return "; ".join(parts)
