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
    g.add_argument("--model-parallel", type=int, default=1, metavar="N",
                   help="split each encoder layer's attention heads and MLP over N devices (tensor parallelism, a "
                        "'model' mesh axis beside 'data'; N divides the devices and every tower's heads)")
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
    g.add_argument("--layer-decay", type=float, default=None, metavar="F",
                   help="layer-wise learning-rate decay: each tower's layer i from the top learns at F**i of the "
                        "rate, its embeddings at F**(depth + 1) (BEiT's, as timm's); none: every layer alike")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW's first-moment decay")
    g.add_argument("--beta2", type=float, default=0.98, help="AdamW's second-moment decay")
    g.add_argument("--eps", type=float, default=1e-6, help="AdamW's epsilon")
    lo = p.add_argument_group("parameter-efficient fine-tuning and averaging")
    lo.add_argument("--lora", type=int, metavar="RANK",
                    help="train low-rank adapters of this rank (LoRA), every weight of the model frozen; the model "
                         "is saved with them merged, and the adapters alone in OUT/adapter in PEFT's layout")
    lo.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA's alpha (the update is scaled by "
                                                                  "alpha / rank, as PEFT's lora_alpha)")
    lo.add_argument("--lora-targets", choices=("attention", "mlp", "both"), default="both",
                    help="the adapted kernels: attention projections, MLP, or both")
    lo.add_argument("--lora-towers", choices=("vision", "text", "both"), default="both",
                    help="the towers adapted")
    lo.add_argument("--ema", type=float, metavar="DECAY",
                    help="also keep an exponential moving average of the trained weights (e.g. 0.999), saved in "
                         "OUT/ema beside the final model")
    a = p.add_argument_group("augmentation and data mixing (as open_clip's --aug-cfg and --train-data a::b)")
    a.add_argument("--augment", action="store_true",
                   help="random resized crops of the training images (open_clip's default: 90%% to 100%% of the "
                        "area, aspect 3:4 to 4:3), drawn per seed, step and row so a resumed run sees the same "
                        "pixels; the options below turn it on too")
    a.add_argument("--aug-scale", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="the crop's share of the image's area (default with --augment: 0.9 1.0)")
    a.add_argument("--color-jitter", type=float, nargs=4, metavar=("B", "C", "S", "H"), default=None,
                   help="colour jitter strengths: brightness, contrast, saturation, hue (hue at most 0.5)")
    a.add_argument("--color-jitter-prob", type=float, default=None,
                   help="probability of jittering an image's colours (default with --color-jitter: 0.8)")
    a.add_argument("--gray-scale-prob", type=float, default=0.0, help="probability of making an image gray")
    a.add_argument("--data-weights", metavar="W1::W2",
                   help="with --data A::B (several sources, '::' between them): each source's upsampling factor, "
                        "'::' between them, as open_clip's --train-data-upsampling-factors (a record of a source "
                        "of weight 2 is drawn twice per epoch); default 1 each")


def check(args) -> None:
    """The options' values, before any work (CommandError naming the option)."""
    at_least(args.accum_steps, "--accum-steps", 1)
    at_least(args.model_parallel, "--model-parallel", 1)
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise CommandError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
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
    augment = augmentation(args)
    if augment is not None and args.cache:
        raise CommandError("--augment (or an --aug-*/--color-jitter/--gray-scale-prob option) with --cache: the LiT "
                           "cache holds the locked tower's features of the unaugmented images, computed once; drop "
                           "one of them")
    weights(args)
    if args.lora is not None:
        at_least(args.lora, "--lora", 1)
        for flag, given in (("--cache", args.cache), ("--unlocked-layers", args.unlocked_layers),
                            ("--lock", args.lock not in (None, "none"))):
            if given:
                raise CommandError(f"--lora trains adapters with every weight frozen: {flag} does not go with it")
        if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
            raise CommandError(f"--lora-alpha must be a positive number, got {args.lora_alpha}")
    if args.ema is not None and not 0 <= args.ema < 1:
        raise CommandError(f"--ema must be a decay in [0, 1), got {args.ema}")
    if args.remat is not None:
        import jax

        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_")
                       and n.islower() and callable(getattr(jax.checkpoint_policies, n)))
        if args.remat not in names:
            raise CommandError(f"--remat {args.remat!r} is not a policy in jax.checkpoint_policies; try "
                               f"{REMAT_EXAMPLES} (all: {', '.join(names)})")


def augmentation(args):
    """The Augment the options ask for, or None (CommandError naming the option for a bad value)."""
    asked = args.augment or args.aug_scale is not None or args.color_jitter is not None or \
        args.color_jitter_prob is not None or args.gray_scale_prob
    if not asked:
        return None
    from dualenc.errors import ConfigError
    from dualenc.processing.augment import Augment

    fields = {"scale": tuple(args.aug_scale or (0.9, 1.0)), "gray_scale_prob": args.gray_scale_prob}
    if args.color_jitter is not None or args.color_jitter_prob is not None:
        fields.update(color_jitter=tuple(args.color_jitter) if args.color_jitter else None,
                      color_jitter_prob=0.8 if args.color_jitter_prob is None else args.color_jitter_prob)
    flags = {"scale": "--aug-scale", "color_jitter": "--color-jitter", "color_jitter_prob": "--color-jitter-prob",
             "gray_scale_prob": "--gray-scale-prob"}
    try:
        return Augment(**fields)
    except ConfigError as e:
        import re

        found = re.match(r"Augment: field '(\w+)'", str(e))  # Augment's errors name the field: name the option
        if found and found.group(1) in flags:
            raise CommandError(flags[found.group(1)] + str(e)[found.end():]) from None
        raise CommandError(str(e)) from None


def sources(data: list[str]) -> list[list[str]]:
    """--data's values split into sources at '::' (inside a value, or as one of its own)."""
    parts = [[]]
    for value in data:
        pieces = value.split("::")
        parts[-1] += [p for p in pieces[:1] if p]
        for piece in pieces[1:]:
            parts.append([piece] if piece else [])
    if any(not part for part in parts):
        raise CommandError(f"--data {' '.join(data)}: a '::' with no source on one side")
    return parts


def weights(args) -> list[float] | None:
    """--data-weights as numbers, one per source of --data (None without it)."""
    count = len(sources(args.data))
    if args.data_weights is None:
        return None
    try:
        values = [float(w) for w in args.data_weights.split("::")]
    except ValueError:
        raise CommandError(f"--data-weights must be numbers separated by '::', got {args.data_weights!r}") from None
    if len(values) != count:
        raise CommandError(f"--data-weights gives {len(values)} weights for the {count} sources of --data "
                           f"(separated by '::'): give one each")
    if not all(math.isfinite(w) and w > 0 for w in values):
        raise CommandError(f"--data-weights must be positive, got {args.data_weights}")
    return values


def lora(args):
    """The LoRA --lora asks for, or None."""
    if args.lora is None:
        return None
    from dualenc.lora import LoRA

    towers = ("vision", "text") if args.lora_towers == "both" else (args.lora_towers,)
    return LoRA(rank=args.lora, alpha=args.lora_alpha, targets=args.lora_targets, towers=towers)


def settings(args) -> dict:
    """The TrainConfig fields the options set."""
    return dict(augment=augmentation(args), lora=lora(args), ema_decay=args.ema, layer_decay=args.layer_decay, dtype=None if args.precision == "float32" else args.precision, fsdp=args.fsdp,
                remat_policy=args.remat, accum_steps=args.accum_steps, patch_dropout=args.patch_dropout,
                weight_decay=args.weight_decay, warmup_steps=args.warmup, grad_clip=args.grad_clip or None,
                beta1=args.beta1, beta2=args.beta2, eps=args.eps)


def mesh(args, devices: int):
    """The run's mesh over `devices` devices: ("data",), or ("data", "model") with --model-parallel; None for
    one device. CommandError when --model-parallel does not divide the devices."""
    import dualenc

    if args.model_parallel > 1:
        if devices % args.model_parallel:
            raise CommandError(f"--model-parallel {args.model_parallel} does not divide the {devices} devices")
        return dualenc.train.model_mesh(devices // args.model_parallel, args.model_parallel)
    return dualenc.train.data_mesh() if devices > 1 else None


def described(run, model_parallel: int = 1) -> str:
    """One line of the start summary: what the run does beyond the plain float32 step."""
    parts = [f"precision {run.dtype or 'float32'}"]
    if model_parallel > 1:
        parts.append(f"tensor parallel over {model_parallel} devices")
    if run.accum_steps > 1:
        parts.append(f"{run.accum_steps} micro-batches of {run.batch_size // run.accum_steps} per step (exact "
                     f"gradient)")
    if run.patch_dropout:
        parts.append(f"patch dropout {run.patch_dropout:g}")
    if run.fsdp:
        parts.append("FSDP")
    if run.layer_decay is not None:
        parts.append(f"layer-wise learning-rate decay {run.layer_decay:g}")
    if run.remat_policy:
        parts.append(f"remat {run.remat_policy}")
    if run.lora is not None:
        parts.append(f"LoRA rank {run.lora.rank} (alpha {run.lora.alpha:g}) on the {' and '.join(run.lora.towers)} "
                     f"towers' {run.lora.targets if isinstance(run.lora.targets, str) else '/'.join(run.lora.targets)}"
                     f" kernels")
    if run.ema_decay is not None:
        parts.append(f"moving average of the weights (decay {run.ema_decay:g})")
    if run.augment is not None:
        a = run.augment
        parts.append(f"augmentation: crops of {a.scale[0]:g}-{a.scale[1]:g} of the area"
                     + (f", colour jitter {'/'.join(f'{x:g}' for x in a.color_jitter)} at p {a.color_jitter_prob:g}"
                        if a.color_jitter else "") + (f", gray at p {a.gray_scale_prob:g}" if a.gray_scale_prob else ""))
    parts.append(f"AdamW (betas {run.beta1:g}, {run.beta2:g}; eps {run.eps:g}; weight decay {run.weight_decay:g}; "
                 f"gradient clip {run.grad_clip if run.grad_clip else 'none'})")
    return "; ".join(parts)
