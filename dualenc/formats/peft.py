"""PEFT's LoRA adapter directories <-> dualenc.lora adapters: adapter_config.json and adapter_model.safetensors.

The tensors are named as PEFT names them for the transformers class the config saves as (CLIPModel,
SiglipModel, VisionTextDualEncoderModel...): `base_model.model.<module>.lora_A.weight` (rank, in) and
`lora_B.weight` (out, rank), the modules taken from the model's checkpoint key table (formats.transformers
.dual_table), so `peft.PeftModel.from_pretrained(model, directory)` loads what save_peft writes.
"""

from __future__ import annotations

import math
import os
import re
import time

import jax
import numpy as np

from dualenc import files, lora as lora_, model, towers
from dualenc.config import DualEncoderConfig
from dualenc.errors import CheckpointError, ConfigError, InputError
from dualenc.formats.transformers import dual_table
from dualenc.formats.weights import CONFIG, carry_over
from dualenc.params import check_tree, listed

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's LoraModel wraps the transformers model as base_model.model
REGEX_SECONDS = 2.0  # what a target_modules regular expression may take, over all of a model's module names
MAX_REGEX = 4096
# adapter_config.json keys that change nothing dualenc computes (dropout trains only; the rest names or inits)
HARMLESS = ("auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
            "lora_dropout", "megatron_core", "qalora_group_size", "loftq_config",
            "eva_config", "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying")
# keys whose values other than these change the computation in ways dualenc's LoRA does not express
DEFAULTS = {"peft_type": ("LORA",), "bias": ("none",), "fan_in_fan_out": (False,), "use_rslora": (False,),
            "use_dora": (False,), "lora_bias": (False,), "use_qalora": (False,),
            # inits that leave the base weights as they are (PiSSA, OLoRA, CorDA, LoftQ change them)
            "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal")}


def _modules(config: DualEncoderConfig) -> dict[str, tuple[tuple[str, ...], int]]:
    """{transformers module name: (its kernel's stacked param path, layer index or -1)} of every module with a
    weight in the model's checkpoint (`text_model.encoder.layers.0.self_attn.q_proj`: the name PEFT matches)."""
    shapes = model.expected_shapes(config)
    out = {}
    for e in dual_table(config):
        if not e.hf.endswith(".weight"):
            continue
        name = e.hf[:-len(".weight")]
        if "{i}" in name:
            out.update({name.format(i=i): (e.path, i) for i in range(shapes["/".join(e.path)][0])})
        else:
            out[name] = (e.path, -1)
    return out


def _matcher(spec, where: str, key: str):
    """name -> whether PEFT's rule for target_modules (or exclude_modules) `spec` picks the module named so
    (peft.tuners.tuners_utils.check_target_module_exists): a name of the list, or a module whose name ends in
    "." + one of them; a string is a regular expression the whole name must match. A stranger's expression
    may backtrack without end: it runs under the regex package's timeout, REGEX_SECONDS for all names."""
    if spec is None:
        return lambda name: False
    if not isinstance(spec, str):
        return lambda name: name in spec or any(name.endswith("." + t) for t in spec)
    try:
        import regex
    except ImportError:
        raise ConfigError(f"{where}: field '{key}' is a regular expression; reading one needs the regex "
                          f"package: pip install regex") from None
    if len(spec) > MAX_REGEX:
        raise ConfigError(f"{where}: field '{key}' is a regular expression of {len(spec)} characters, over "
                          f"{MAX_REGEX}")
    try:
        compiled = regex.compile(spec)
    except (regex.error, RecursionError, OverflowError) as e:
        raise ConfigError(f"{where}: field '{key}' is not a valid regular expression: {e}") from None
    deadline = time.monotonic() + REGEX_SECONDS

    def hit(name: str) -> bool:
        try:
            return compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 1e-3)) is not None
        except TimeoutError:
            raise ConfigError(f"{where}: field '{key}' took over {REGEX_SECONDS} s to match the model's module "
                              f"names (a regular expression that backtracks without end?)") from None
    return hit


def target_modules(config: DualEncoderConfig, lora: lora_.LoRA) -> list[str] | str:
    """PEFT's target_modules for these adapters: the modules' last names (["q_proj", "v_proj"]) where they
    pick out exactly the adapted modules of the model, else a regular expression matching exactly them."""
    paths = set(lora_.targets(config, lora))
    modules = _modules(config)
    adapted = {name for name, (path, _) in modules.items() if path in paths}
    short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    picks = _matcher(short, "", "target_modules")
    if {name for name in modules if picks(name)} == adapted:
        return short
    templates = sorted({e.hf[:-len(".weight")] for e in dual_table(config) if e.path in paths})
    return "|".join(re.escape(t).replace(re.escape("{i}"), r"\d+") for t in templates)


def save_peft(directory: str | os.PathLike, adapters: dict, config: DualEncoderConfig, lora: lora_.LoRA, *,
              base_model_name_or_path: str | None = None) -> str:
    """Writes adapters (either layer layout) as a PEFT LoRA adapter directory, atomically: adapter_config.json
    (LoraConfig's fields) and adapter_model.safetensors. Other files already in `directory` are kept; a
    directory holding a model (config.json or weights) is refused: adapters go in a folder of their own."""
    directory = os.fspath(directory)
    if os.path.isdir(directory):
        held = [f for f in os.listdir(directory) if f == CONFIG or (f.endswith(".safetensors")
                                                                     and f != ADAPTER_WEIGHTS)]
        if held:
            raise ConfigError(f"save_peft: {directory} holds a model ({', '.join(sorted(held))}); save the adapters "
                              f"to a folder of their own")
    tensors = _tensors(adapters, config, lora)
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else float(lora.alpha)
    adapter_config = {
        "peft_type": "LORA", "r": lora.rank, "lora_alpha": alpha, "target_modules": target_modules(config, lora),
        "lora_dropout": 0.0, "bias": "none", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "target_parameters": None,
        "lora_bias": False, "revision": None, "auto_mapping": None,
    }
    with files.atomic_directory(directory) as tmp:
        carry_over(directory, tmp)
        files.write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), tensors)
        files.write_json_atomic(os.path.join(tmp, ADAPTER_CONFIG), adapter_config)
    return directory


def _tensors(adapters: dict, config: DualEncoderConfig, lora: lora_.LoRA) -> dict[str, np.ndarray]:
    """PEFT's tensors of the adapters, checked against what lora adapts in config."""
    specs = lora_.specs(config, lora)
    if not isinstance(adapters, dict):
        raise InputError(f"save_peft: adapters must be the dict dualenc.lora.init gives, got {type(adapters).__name__}")
    stacked = model.stack_layers(adapters)
    flat = {"/".join(map(str, (getattr(k, "key", k) for k in path))): np.asarray(jax.device_get(leaf), np.float32)
            for path, leaf in jax.tree_util.tree_leaves_with_path(stacked)}
    expected = {}
    for p in specs:
        where = "/".join(p.path[:-1])
        expected[where + "/a"] = (p.layers, p.shape[0], lora.rank)
        expected[where + "/b"] = (p.layers, lora.rank, p.shape[1])
    check_tree(expected, {k: v.shape for k, v in flat.items()}, f"save_peft: the adapters do not match {lora}")
    names = {e.path: e.hf[:-len(".weight")] for e in dual_table(config)}
    out = {}
    for p in specs:
        where, module = "/".join(p.path[:-1]), PREFIX + names[p.path]
        for i in range(p.layers):
            out[module.format(i=i) + ".lora_A.weight"] = flat[where + "/a"][i].T
            out[module.format(i=i) + ".lora_B.weight"] = flat[where + "/b"][i].T
    return out


def load_peft(directory: str | os.PathLike, params: dict, config: DualEncoderConfig) -> tuple[dict, lora_.LoRA]:
    """Reads a PEFT LoRA adapter directory written for this model (by save_peft or by peft itself) as
    (adapters in params' layer layout, LoRA). Strict: a setting dualenc's LoRA cannot express (DoRA, rsLoRA,
    rank or alpha patterns, some layers only, modules other than the encoder layers' projections, adapted
    biases), unknown, missing or mis-shaped tensors are errors naming the file."""
    directory = os.fspath(directory)
    config_path, weights_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    raw = files.read_json(config_path, "PEFT adapter config")
    lora = _lora(raw, config, config_path)
    specs = lora_.specs(config, lora)
    names = {e.path: PREFIX + e.hf[:-len(".weight")] for e in dual_table(config)}
    expected = {}
    for p in specs:
        for i in range(p.layers):
            module = names[p.path].format(i=i)
            expected[module + ".lora_A.weight"] = (lora.rank, p.shape[0])
            expected[module + ".lora_B.weight"] = (p.shape[1], lora.rank)
    if not os.path.isfile(weights_path):
        raise CheckpointError(f"{directory} has no {ADAPTER_WEIGHTS}")
    tensors, _ = files.read_safetensors(weights_path)
    wrong = [f"{n} of dtype {a.dtype} (expected floating point)" for n, a in tensors.items()
             if a.dtype not in files.FLOATING]
    check_tree(expected, {n: tuple(a.shape) for n, a in tensors.items()}, weights_path, noun="tensor",
               error=CheckpointError, also_wrong=wrong)
    out: dict = {}
    for p in specs:
        module = names[p.path]
        a = np.stack([np.asarray(tensors[module.format(i=i) + ".lora_A.weight"], np.float32).T
                      for i in range(p.layers)])
        b = np.stack([np.asarray(tensors[module.format(i=i) + ".lora_B.weight"], np.float32).T
                      for i in range(p.layers)])
        node = out
        for k in p.path[:-2]:
            node = node.setdefault(k, {})
        node[p.path[-2]] = {"a": jax.numpy.asarray(a), "b": jax.numpy.asarray(b)}
    return lora_.like(out, params), lora


def _lora(raw: dict, config: DualEncoderConfig, where: str) -> lora_.LoRA:
    """The LoRA an adapter_config.json describes for this model; ConfigError naming the file otherwise."""
    for key, allowed in DEFAULTS.items():
        if raw.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"{where}: field '{key}' = {raw[key]!r} is not supported; dualenc reads "
                              f"{allowed[0]!r}")
    known = {"r", "lora_alpha", "target_modules", "exclude_modules", *HARMLESS, *DEFAULTS}
    odd = sorted(k for k, v in raw.items() if k not in known and v not in (None, False, {}, [], ""))
    if odd:
        raise ConfigError(f"{where}: dualenc's LoRA cannot express {', '.join(f'{k} = {raw[k]!r}' for k in odd)}")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{where}: field 'r' must be an integer of at least 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
            not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"{where}: field 'lora_alpha' must be a positive number, got {alpha!r}")
    tm, exclude = raw.get("target_modules"), raw.get("exclude_modules")
    for key, value in (("target_modules", tm), ("exclude_modules", exclude)):
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value))
                or (value is None and key == "exclude_modules")):
            raise ConfigError(f"{where}: field '{key}' must be a list of module names or a regular expression, "
                              f"got {value!r}")
    picks, excluded = _matcher(tm, where, "target_modules"), _matcher(exclude, where, "exclude_modules")
    matched = {name: at for name, at in _modules(config).items() if picks(name) and not excluded(name)}
    everything = lora_.LoRA(rank=r, alpha=alpha, targets="both", towers=towers.SIDES)
    adaptable = set(lora_.targets(config, everything))
    outside = sorted(name for name, (path, _) in matched.items() if path not in adaptable)
    if outside:
        raise ConfigError(f"{where}: target_modules {tm!r} adapts {listed(outside)}; dualenc's LoRA adapts the "
                          f"encoder layers' attention and MLP projections only")
    if not matched:
        raise ConfigError(f"{where}: target_modules {tm!r} matches no module of this {config.kind.architecture}")
    layers = {}
    for path, i in matched.values():
        layers.setdefault(path, set()).add(i)
    depth = model.expected_shapes(config)
    partial = sorted("/".join(p) for p, found in layers.items() if len(found) != depth["/".join(p)][0])
    if partial:
        raise ConfigError(f"{where}: target_modules {tm!r} adapts some layers only of {listed(partial)}; "
                          f"dualenc's LoRA adapts every layer")
    parts = {side: tuple(part for part in lora_.PARTS if any(p[0] == side and p[-2] == part for p in layers))
             for side in towers.SIDES}
    sides = tuple(side for side in towers.SIDES if parts[side])
    if len({parts[side] for side in sides}) != 1:
        raise ConfigError(f"{where}: target_modules {tm!r} adapts other parts in each tower "
                          f"({', '.join(f'{s}: {list(parts[s])}' for s in sides)}); dualenc's LoRA adapts the same")
    chosen = parts[sides[0]]
    targets = next((name for name, named in lora_.TARGETS.items() if named == chosen), chosen)
    lora = lora_.LoRA(rank=r, alpha=alpha, targets=targets, towers=sides)
    if set(lora_.targets(config, lora)) != set(layers):
        raise ConfigError(f"{where}: target_modules {tm!r} does not name a set of kernels dualenc's LoRA adapts")
    return lora
