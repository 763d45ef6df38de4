"""mergekit's parameter settings (mergekit/config.py), mirrored here because importing mergekit.config pulls in peft
and transformers (~4 s). Same types and the same resolution; the only difference is that a misspelt key in a
{value, filter} condition is an error.

    setting = parse_setting([0.2, 0.8])                 # a gradient over the selected layers
    resolve(spec_param, [per_model, shared], "model.layers.3.mlp.up_proj.weight", t=0.5)
"""

from __future__ import annotations

import hashlib
from typing import Union

from pydantic import BaseModel, ConfigDict


# mergekit's parameter settings (mergekit/config.py), mirrored here because importing
# mergekit.config pulls in peft and transformers (~4 s). Same types and the same resolution;
# the only difference is that a misspelt key in a {value, filter} condition is an error.
Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    value: ScalarOrGradient
    filter: str | None = None


Setting = Union[Condition, list[Condition], ScalarOrGradient]


def parse_setting(value):
    """A YAML parameter value -> a setting: scalar, gradient (list), or list of {value, filter}."""
    from pydantic import TypeAdapter

    return TypeAdapter(Setting).validate_python(value)


def evaluate_setting(tensor_name: str, setting, t: float, *, validate):
    """mergekit.config.evaluate_setting: filters match by substring; gradients interpolate at t."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, (float, int, bool, str)):
        return validate(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (float, int, bool, str)) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return validate((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, validate=validate)
        return None
    raise ValueError(f"unexpected setting value: {setting!r}")


def resolve(parameter, settings: list, tensor_name: str, t: float):
    """mergekit's precedence: the first scope holding the parameter whose filters match wins."""
    for setting in settings:
        if setting is not None:
            value = evaluate_setting(tensor_name, setting, t, validate=parameter.validate)
            if value is not None:
                return value
    if parameter.required:
        raise KeyError(parameter.name)
    return parameter.validate(parameter.default)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: the same tensor gets the same random draws whatever the order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)
