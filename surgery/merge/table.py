"""The backend table: every implementation of every merge method surgery computes, what each can do, and the one
rule that picks one.

Each method module (``linear``, ``task_arithmetic``, ``ties``, ``gta``) lists its backends in ``BACKENDS``, fastest
first; mergekit's own kernel (``mergekit_kernel``) ends every list and computes every method mergekit has. A
backend states the merge dtypes it computes in, the devices it runs on, its exactness contract, the compiled
modules it needs and any condition on the node's parameters. ``choose`` takes the first row that applies and that
the backend level allows (``surgery run --backend``, ``core.devices``).

``surgery backends`` (the CLI) and docs/performance.md print this table.
"""

from __future__ import annotations

from surgery.core import devices
from surgery.merge import consensus, gta, iso, lines, linear, mergekit_kernel, task_arithmetic, ties, tsv_m
from surgery.merge.backend import Backend
from surgery.merge.numeric import merge_dtype

LEVELS = {"auto": ("compiled", "numpy", "torch", "mergekit"), "numpy": ("numpy", "torch", "mergekit"),
          "torch": ("torch", "mergekit"), "mergekit": ("mergekit",)}
TABLE: dict[str, tuple[Backend, ...]] = {
    "linear": linear.BACKENDS, "task_arithmetic": task_arithmetic.BACKENDS, "ties": ties.BACKENDS,
    "breadcrumbs": gta.BACKENDS, "breadcrumbs_ties": gta.BACKENDS,
    "tsv_m": tsv_m.BACKENDS,
    "iso_c": iso.BACKENDS_C,
    "iso_cts": iso.BACKENDS_CTS,
    "lines": lines.BACKENDS,
    "consensus": consensus.BACKENDS,
}


def rows(method: str) -> tuple[Backend, ...]:
    """Every backend of ``method``, in the order ``choose`` tries them (mergekit's kernel last, for the methods
    mergekit has)."""
    from surgery.merge.specs import LOCAL

    own = TABLE.get(method, ())
    return own if method in LOCAL and not LOCAL[method].mergekit else own + (mergekit_kernel.backend(method),)


def choose(params: dict, stored: list[str], device: str = "cpu", *, host: bool = True) -> Backend:
    """The backend that computes this merge node: the first row of its method that the backend level allows,
    that runs on ``device``, computes in the node's merge dtype and accepts its parameters. ``host``: whether
    host backends may be chosen (False on the torch path, whose tensors are already read)."""
    allowed = LEVELS[devices.backend()]
    dtype = merge_dtype(params, stored)
    kind = device.split(":")[0]
    candidates = rows(params["method"])
    if candidates[-1].name != "mergekit":  # a method mergekit lacks: its torch backend whatever the level
        allowed = allowed + ("torch",)
    for b in candidates:
        if b.name not in allowed or kind not in b.devices and b.devices != ("*",):
            continue
        if b.host and (not host or kind != "cpu" or dtype is None or params.get("vocab") is not None):
            continue
        if (b.dtypes and dtype not in b.dtypes) or not b.when(params, dtype) or not b.available():
            continue
        return b
    raise AssertionError(f"no backend for {params['method']}: mergekit's own kernel takes every node of its methods, "
                         "and surgery's own methods have a torch backend on every device")


def run(backend: Backend, tensors: list, p: dict, device: str = "cpu"):
    """``backend`` on torch tensors; a wrapping backend gets its base method's result, computed first by the
    backend ``choose`` picks for that method."""
    if backend.wraps:
        from surgery.io.safetensors import st_dtype
        from surgery.merge.task_vectors import base_node

        node = base_node(p)
        inner = choose(node, [st_dtype(t.dtype) for t in tensors], device, host=False)
        return backend.kernel(tensors, p, run(inner, tensors, node, device))
    return backend.kernel(tensors, p, mergekit_parameters(p))


def describe() -> list[dict]:
    """The table, one dict a row, for ``surgery backends`` and the docs."""
    out = []
    for method in ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "tsv_m", "iso_c", "iso_cts",
                   "lines", "consensus", "any other"):
        for b in rows(method):
            out.append({"method": method, "backend": b.name, "dtypes": ", ".join(b.dtypes) or "any",
                        "devices": "any" if b.devices == ("*",) else ", ".join(b.devices), "exact": b.exact,
                        "when": b.note or "-", "needs": ", ".join(f"{m}.c" for m in b.needs) or "-",
                        "available": b.available()})
    return out


def mergekit_parameters(p: dict) -> dict:
    """A node's parameters in mergekit's form: shared ones by name, per-input ones as {name: {input: value}}."""
    parameters = dict(p["shared"])
    per_input: dict[str, dict] = {}
    for i, values in p["per_input"].items():
        for k, v in values.items():
            per_input.setdefault(k, {})[i] = v
    parameters.update(per_input)
    return parameters
