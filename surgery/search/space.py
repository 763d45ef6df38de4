"""Search variables inside a recipe: find them, check them, fill them in.

    bottom: {int: [0, 8]}                       # an integer in [0, 8]
    t: {float: [0.01, 1.0], log: true}          # a float, sampled on a log scale
    weight: {float: [0, 1], step: 0.25}         # a float on a grid (what the grid sampler needs)
    transition: {choice: [0, 1, 2]}             # one of the values (any YAML, even a whole mapping)
    weight: {float: [0, 1], layer_granularity: 4}   # one variable per group of 4 layers (merge parameters)

A variable is a mapping with exactly one of ``int``/``float``/``choice`` whose value is a list, plus
optional ``log``, ``step`` and ``layer_granularity``. Its name is its path in the recipe
(``operations.0.layer_swap.bottom``). ``substitute`` turns sampled values into a plain recipe dict.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field

from surgery.errors import RecipeError

KINDS = ("int", "float", "choice")
OPTIONS = ("log", "step", "layer_granularity")
SCALAR = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Variable:
    path: tuple            # where it sits in the recipe mapping
    kind: str              # int | float | choice
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    log: bool = False
    step: float | None = None
    layer_granularity: int | None = None
    where: str = ""        # file:line: path, for errors
    groups: tuple = field(default=(), compare=False)  # per-layer: ((first, last), ...) once the layer count is known

    @property
    def name(self) -> str:
        return ".".join(str(p) for p in self.path)

    @property
    def scalar_choices(self) -> bool:
        return all(isinstance(c, SCALAR) for c in self.choices)

    def param_names(self) -> list[str]:
        """Optuna parameter names: one, or one per layer group (name[a-b])."""
        if not self.groups:
            return [self.name]
        return [f"{self.name}[{a}-{b}]" for a, b in self.groups]

    def distribution(self):
        import optuna.distributions as d

        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.kind == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        return d.CategoricalDistribution(list(self.choices) if self.scalar_choices else list(range(len(self.choices))))

    def grid(self) -> list:
        """Every value, for the grid sampler (a float needs a step)."""
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "float":
            if self.step is None:
                raise RecipeError(f"the grid sampler needs a step for a float variable: {{float: [{self.low}, "
                                  f"{self.high}], step: ...}}", self.where)
            n = int(math.floor((self.high - self.low) / self.step + 1e-9))
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        return list(self.choices) if self.scalar_choices else list(range(len(self.choices)))

    def value(self, sampled):
        """The recipe value of a sampled parameter (a choice of mappings is sampled by index)."""
        if self.kind == "choice" and not self.scalar_choices:
            return copy.deepcopy(self.choices[int(sampled)])
        return sampled

    def corners(self) -> list:
        """The values schema validation tries: both ends of a range, or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        inner = self.low + (self.high - self.low) * 0.37  # a fractional value: an int field must reject it
        return [float(self.low), float(self.high)] + ([inner] if inner != round(inner) else [])


def is_variable(node) -> bool:
    return isinstance(node, dict) and sum(k in node for k in KINDS) == 1 and \
        isinstance(next(node[k] for k in KINDS if k in node), list)


def find_variables(data, where, prefix: tuple = ()) -> list[Variable]:
    """Every search variable under ``data``, checked. ``where(path)`` gives 'file:line: path'."""
    found = []

    def walk(node, path):
        if is_variable(node):
            found.append(parse_variable(node, path, where))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))

    walk(data, prefix)
    return found


def parse_variable(node: dict, path: tuple, where) -> Variable:
    kind = next(k for k in KINDS if k in node)
    at = where(path)
    unknown = [k for k in node if k not in KINDS and k not in OPTIONS]
    if unknown:
        raise RecipeError(f"unknown key {unknown[0]!r} in a search variable (valid: {kind}, "
                          f"{', '.join(OPTIONS)})", at)
    values, log, step, gran = node[kind], node.get("log", False), node.get("step"), node.get("layer_granularity")
    if not isinstance(log, bool):
        raise RecipeError(f"log is true or false, got {log!r}", at)
    if gran is not None and (isinstance(gran, bool) or not isinstance(gran, int) or gran < 1):
        raise RecipeError(f"layer_granularity is a layer count >= 1, got {gran!r}", at)
    if kind == "choice":
        if not values:
            raise RecipeError("empty choice: give at least one value", at)
        if log or step is not None:
            raise RecipeError("log and step apply to int and float variables, not to a choice", at)
        if any(find_variables(v, lambda p: at) for v in values):
            raise RecipeError("a choice cannot contain search variables", at)
        return Variable(path, kind, choices=tuple(values), layer_granularity=gran, where=at)
    numeric = (int,) if kind == "int" else (int, float)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, numeric) for v in values):
        raise RecipeError(f"{kind} takes a range [low, high] of {'integers' if kind == 'int' else 'numbers'}, "
                          f"got {values!r}", at)
    low, high = values
    if low > high:
        raise RecipeError(f"empty range [{low}, {high}]: low must not exceed high", at)
    if log and low <= 0:
        raise RecipeError(f"a log-scale range must be positive, got [{low}, {high}]", at)
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, numeric) or step <= 0:
            raise RecipeError(f"step is a positive {'integer' if kind == 'int' else 'number'}, got {step!r}", at)
        if log:
            raise RecipeError("step and log cannot be combined (optuna samples a stepped range linearly)", at)
    return Variable(path, kind, low=low, high=high, log=log, step=step, layer_granularity=gran, where=at)


def with_layer_groups(variables: list[Variable], n_layers: int) -> list[Variable]:
    """Give per-layer variables their groups of ``layer_granularity`` layers (the last may be shorter)."""
    out = []
    for v in variables:
        if v.layer_granularity:
            g = v.layer_granularity
            groups = tuple((a, min(a + g, n_layers) - 1) for a in range(0, n_layers, g))
            v = Variable(**{**v.__dict__, "groups": groups})
        out.append(v)
    return out


def substitute(data, values: dict) -> dict:
    """A copy of ``data`` with every variable at ``path`` replaced by ``values[path]``."""
    out = copy.deepcopy(data)
    for path, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        node = out
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return out


def expand_layer_groups(data: dict, variables: list[Variable], sampled: dict) -> tuple[dict, dict]:
    """Split each operation holding per-layer variables into one copy per layer group.

    As in a mergekit-evolve genome's slices: the first copy applies to every tensor with group 0's
    values (so the embeddings get them); each later copy restricts itself to its group with
    ``select: {layers: 'a-b'}`` and, coming later, wins there; a last copy gives the final norm and
    lm_head the last group's values (unless the operation selects modules itself; a tied lm_head is no
    tensor and is skipped, as mergekit skips it in the slices config of a genome). Returns the
    recipe data and the values of the plain variables (path -> value).
    """
    plain = {v.path: v.value(sampled[v.name]) for v in variables if not v.groups}
    per_op: dict[int, list[Variable]] = {}
    for v in variables:
        if v.groups:
            per_op.setdefault(v.path[1], []).append(v)
    if not per_op:
        return data, plain
    data = substitute(data, plain)
    ops = []
    for i, op in enumerate(data["operations"]):
        if i not in per_op:
            ops.append(op)
            continue
        (name, body), = op.items()
        groups = per_op[i][0].groups
        selects = [None] + [{"layers": f"{a}-{b}"} for a, b in groups[1:]]
        if len(groups) > 1 and not (body.get("select") or {}).get("modules"):
            selects.append({"modules": ["final_norm", "lm_head"], "missing": "skip"})  # a tied lm_head: none
        for g, select in enumerate(selects):
            g = min(g, len(groups) - 1)
            values = {("operations", 0) + v.path[2:]: v.value(sampled[v.param_names()[g]]) for v in per_op[i]}
            body_g = substitute({"operations": [op]}, values)["operations"][0][name]
            if select:
                body_g["select"] = {**(body_g.get("select") or {}), **select}
            ops.append({name: body_g})
    return {**data, "operations": ops}, {}


def resolve(data: dict, variables: list[Variable], sampled: dict) -> dict:
    """The plain recipe dict for sampled parameter values (param name -> value)."""
    expanded, plain = expand_layer_groups(data, variables, sampled)
    return substitute(expanded, plain) if plain else expanded


def recipe_hash(data: dict) -> str:
    """Identity of a resolved recipe: equal configurations hash equal (key order does not matter)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
