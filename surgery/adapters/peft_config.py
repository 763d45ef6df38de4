"""adapter_config.json: typed checks of the fields surgery reads, and PEFT's rule for which modules an
adapter targets (``peft.tuners.tuners_utils.check_target_module_exists``).

    config = check_config(json.loads(text), "adapters/lora/adapter_config.json")   # SurgeryError on a bad field
    targeted(config, "model.layers.0.self_attn.q_proj")                              # True / False
"""

from __future__ import annotations

import re

from surgery.errors import SurgeryError


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


def _names(v) -> bool:  # None, a regex string, or a list of module names
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


CHECKS = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "lora_alpha": (lambda v: _num(v), "a number"),
    "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_int(x) and x >= 1 for x in v.values())),
                     "a mapping of module pattern to a positive integer"),
    "alpha_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_num(x) for x in v.values())),
                      "a mapping of module pattern to a number"),
    "target_modules": (_names, "a list of module names or a regex string"),
    "exclude_modules": (_names, "a list of module names or a regex string"),
    "feedforward_modules": (_names, "a list of module names or a regex string"),
    "modules_to_save": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                        "a list of module names"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "layers_to_transform": (lambda v: v is None or _int(v) or (isinstance(v, list) and all(_int(x) for x in v)),
                            "an integer or a list of integers"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str)
                       or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                       "a string or a list of strings"),
}


def check_config(config, where: str) -> dict:
    """Refuse a config that is not a JSON object or has a field of the wrong type or an invalid regex."""
    if not isinstance(config, dict):
        raise SurgeryError(f"{where}: a JSON {type(config).__name__}, not an object")
    for key, (ok, what) in CHECKS.items():
        if key in config and not ok(config[key]):
            raise SurgeryError(f"{where}: {key}: expected {what}, got {config[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            _regex(pattern, where, key)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), str):
            _regex(config[key], where, key)
    return config


def _regex(pattern: str, where: str, key: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise SurgeryError(f"{where}: {key}: invalid regex {pattern!r}: {e}") from None


OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")  # what 'all-linear' leaves out (PEFT: the output embedding)


def targeted(config: dict, key: str) -> bool:
    """Whether PEFT would wrap module ``key`` (its name in the base model) with this adapter: PEFT creates
    adapter layers only there, and ignores saved tensors of any other module."""
    exclude = config.get("exclude_modules")
    if exclude:
        if re.fullmatch(exclude, key) if isinstance(exclude, str) else _listed(exclude, key):
            return False
    for m in config.get("modules_to_save") or []:
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return True  # PEFT fills its per-architecture defaults; a saved config always lists them
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return key.rsplit(".", 1)[-1] not in OUTPUT_EMBEDDINGS
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    patterns = config.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == indexes if isinstance(indexes, int) else index in indexes


def _listed(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)
