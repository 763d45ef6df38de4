"""Where to listen in a model: its transformer blocks and MLP activations, found through the layout data.

    points = find_points(model, source="base/")
    points.layers      # [(0, <block module>), ...]       outputs: the residual stream after each block
    points.mlp         # [(0, <gate_proj>, fused), ...]   outputs: the MLP pre-activation per neuron

No architecture is named here. Every parameter name of the model goes through ``Layout`` (the same
tables `surgery diff` and the recipes use): a parameter's layer index and module kind give the block
module (its name minus the part after the layer index) and the MLP modules. The activation of
neuron j is read at the output of its gate (``mlp_gate``; the first half of a fused ``mlp_gate_up``)
or, in MLPs without a gate, of its up projection (fc1, ``c_fc``, ``intermediate.dense``): that is
the pre-activation, and act_fn(x) > 0 exactly when x > 0 for SiLU, GELU and ReLU, which is the
"activated" event LAPE counts (Tang et al. 2024). Index j is the neuron index the neuron
operations use (row j of gate/up, column j of down).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.core.layout import Layout
from surgery.errors import SurgeryError

_ACT_KINDS = ("mlp_gate", "mlp_gate_up", "mlp_up")  # preference order within a layer


@dataclass
class Points:
    layers: list            # [(layer index, module)] in layer order
    mlp: list               # [(layer index, module, fused gate_up)] in layer order
    layout: Layout


def find_points(model, source: str = "model") -> Points:
    config = model.config.to_dict()
    names = [n for n, _ in model.named_parameters()]
    layout = Layout.detect(config, names, source=source)
    blocks: dict[int, str] = {}
    for name in names:
        info = layout.info(name)
        if info.layer is not None:
            blocks.setdefault(info.layer, name[: len(name) - len(info.suffix)].rstrip("."))
    if not blocks:
        raise SurgeryError(f"{source}: no transformer layers found in the parameter names "
                           f"(model_type {config.get('model_type')!r})")
    modules = dict(model.named_modules())
    missing = [b for b in blocks.values() if b not in modules]
    if missing:
        raise SurgeryError(f"{source}: layer module {missing[0]!r} not found in the model")
    act: dict[int, tuple[int, str]] = {}
    for name, module in modules.items():
        if "weight" not in module._parameters:
            continue
        info = layout.info(name + ".weight")
        if info.layer is None or info.kind not in _ACT_KINDS:
            continue
        rank = _ACT_KINDS.index(info.kind)
        if info.layer not in act or rank < act[info.layer][0]:
            act[info.layer] = (rank, name)
    layers = [(i, modules[blocks[i]]) for i in sorted(blocks)]
    mlp = [(i, modules[act[i][1]], _ACT_KINDS[act[i][0]] == "mlp_gate_up") for i in sorted(act)]
    return Points(layers, mlp, layout)


def require_mlp(points: Points, source: str, model_type: str) -> None:
    """LAPE needs an MLP activation in every layer."""
    have = {i for i, _, _ in points.mlp}
    want = {i for i, _ in points.layers}
    if not have:
        raise SurgeryError(f"{source}: no MLP found in the layout of model_type {model_type!r} "
                           "(language neurons need gate/up projections; run with --no-lape)")
    if have != want:
        raise SurgeryError(f"{source}: MLP found in layers {sorted(have)} but the model has layers "
                           f"{sorted(want)[0]}-{sorted(want)[-1]}; run with --no-lape")
