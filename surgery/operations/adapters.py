"""Recipe operations on adapter inputs: stacking (MAD-X) and AdaMergeX.

    operations:
      - apply_adapters: {adapters: [lang_sw, task_ner]}          # W + ΔW_lang + ΔW_task
      - adamergex: {task: ner_en, target_ref: lm_sw, source_ref: lm_en, t: 1.0}

Both act on each selected tensor's current tree (the recipient's tensor unless an earlier operation
changed it), so the recipient is normally the adapters' base. Adapters declared on another base are
allowed (e.g. a task LoRA applied to a merged model) and noted in the plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from surgery.errors import SurgeryError
from surgery.core.graph import Node, Ref
from surgery.recipe.schema import Operation, Select

if TYPE_CHECKING:
    from surgery.adapters.view import AdapterCheckpoint


class ApplyAdapters(Operation):
    """Stack adapters onto the selected tensors, in order: W + Σ wᵢ·ΔWᵢ (for (IA)³: W ⊙ l)."""

    op_name: ClassVar[str] = "apply_adapters"

    adapters: list[str] = Field(description=(
        "Adapter inputs, applied in order (MAD-X: language adapter, then task adapter)."))
    weights: list[float] | None = Field(None, description=(
        "One weight per adapter, scaling its ΔW (LoRA only). Default: all 1."))
    select: Select | None = None

    def input_refs(self):
        return {"adapters": list(self.adapters)}

    def plan(self, ctx) -> None:
        _plan_apply(ctx, self)


class AdaMergeX(Operation):
    """Zhao et al. 2024: A_tgt,task = A_src,task ⊕ t·(A_tgt,ref ⊖ A_src,ref), applied to the selected tensors."""

    op_name: ClassVar[str] = "adamergex"

    task: str = Field(description="Adapter input: the task, trained in the source language.")
    target_ref: str = Field(description="Adapter input: the reference task in the target language.")
    source_ref: str = Field(description="Adapter input: the reference task in the source language.")
    t: float = Field(1.0, description="Weight of the language difference.")
    mode: Literal["delta", "factors"] = Field("delta", description=(
        "LoRA: 'delta' adds ΔW (exact); 'factors' adds A and B separately, as the original implementation does. (IA)³ "
        "is always multiplicative."))
    select: Select | None = None

    def input_refs(self):
        return {"task": [self.task], "target_ref": [self.target_ref], "source_ref": [self.source_ref]}

    def plan(self, ctx) -> None:
        _plan_adamergex(ctx, self)


def _adapter(ctx, name: str, field: tuple) -> AdapterCheckpoint:
    from surgery.adapters.view import AdapterCheckpoint  # imported by recipes that use adapters only

    ck = ctx.inputs[name]
    if not isinstance(ck, AdapterCheckpoint):
        raise ctx.error(field, f"input {name!r} is a checkpoint, not an adapter (declare it as "
                               "{adapter: DIR, base: INPUT})")
    return ck


def _note_base(ctx, views: list[AdapterCheckpoint]) -> None:
    for v in views:
        if v.base_input != ctx.recipient:
            ctx.annotations.append(f"adapter {v.name} (base {v.base_input}) is applied to the tensors of "
                                   f"{ctx.recipient}")


def _plan_apply(ctx, op: ApplyAdapters) -> None:
    views = [_adapter(ctx, n, ("adapters", i)) for i, n in enumerate(op.adapters)]
    weights = op.weights if op.weights is not None else [1.0] * len(views)
    if len(weights) != len(views):
        raise ctx.error(("weights",), f"{len(weights)} weights for {len(views)} adapters")
    _note_base(ctx, views)
    for e in ctx.select(op.select):
        node, hit = e.node, False
        for v, w in zip(views, weights):
            if v.touched(e.source_name):
                try:
                    node = v.tree(e.source_name, node, w, ctx.ref(v.name, e))
                except SurgeryError as ex:  # (IA)³ with a weight
                    raise ctx.error(("weights",), str(ex)) from None
                hit = True
        if hit:
            ctx.assign(e, node)


def _plan_adamergex(ctx, op: AdaMergeX) -> None:
    task, tgt, src = views = [_adapter(ctx, getattr(op, f), (f,)) for f in ("task", "target_ref", "source_ref")]
    kinds = {v.peft_type for v in views}
    if len(kinds) != 1:
        raise ctx.error((), "AdaMergeX needs adapters of one type; got "
                        + ", ".join(f"{v.name}: {v.peft_type}" for v in views))
    _note_base(ctx, views)
    kind = kinds.pop()
    ctx.annotations.append(f"adamergex: {task.name} + {op.t:g}·({tgt.name} ⊖ {src.name}), "
                           f"{'multiplicative (IA)³' if kind == 'IA3' else 'LoRA ' + op.mode}")
    for e in ctx.select(op.select):
        name = e.source_name
        if not any(v.touched(name) for v in views):
            continue
        ref = ctx.ref(task.name, e)
        if kind == "LORA" and op.mode == "delta":
            node = e.node
            for v, w in zip(views, (1.0, op.t, -op.t)):
                node = v.tree(name, node, w, ref)
        else:
            node = _paired(ctx, views, name, e.node, op, ref)
        ctx.assign(e, node)


def _paired(ctx, views, name, under, op: AdaMergeX, ref: Ref):
    """Factor-wise combination: the three adapters must have matching terms on this tensor."""
    from surgery.adapters.view import apply_terms

    task, tgt, src = views
    terms = [v.adapter.terms.get(name, []) for v in views]
    kinds = [sorted(t.kind for t in ts) for ts in terms]
    if not (kinds[0] == kinds[1] == kinds[2]):
        missing = [v.name for v, k in zip(views, kinds) if k != max(kinds, key=len)]
        raise ctx.error(("task",), f"tensor {name!r}: adapters {', '.join(missing)} do not adapt it like the "
                                   f"others ({op.mode if task.peft_type == 'LORA' else '(IA)³'} AdaMergeX needs "
                                   "the same modules in all three adapters)")
    node = under
    for t_task in terms[0]:
        match = [next(t for t in ts if t.kind == t_task.kind) for ts in terms]
        raws = [[Ref(v.raw_input, k, ref.layer, ref.out_layer) for k in t.keys] for v, t in zip(views, match)]
        if t_task.kind == "lora":
            ranks = {t.rank for t in match}
            scales = {t.scaling for t in match}
            if len(ranks) != 1 or len(scales) != 1:
                raise ctx.error(("mode",), f"tensor {name!r}: factor-wise AdaMergeX needs equal ranks and "
                                           f"scalings; got ranks {[t.rank for t in match]}, scalings "
                                           f"{[t.scaling for t in match]} (use mode: delta)")
            a = Node("adamergex", [r[0] for r in raws], {"t": op.t})
            b = Node("adamergex", [r[1] for r in raws], {"t": op.t})
            node = Node("lora", [node, a, b], {"scaling": t_task.scaling, "fan_in_fan_out": t_task.fan_in_fan_out,
                                               "label": f"adamergex factors {task.name}", "weight": 1.0})
        elif t_task.kind in ("ia3", "ia3_bias"):
            vec = Node("ia3_adamergex", [r[0] for r in raws], {"t": op.t})
            node = Node("ia3", [node, vec], {"fan_in_fan_out": t_task.fan_in_fan_out,
                                             "bias": t_task.kind == "ia3_bias", "label": f"adamergex {task.name}"})
        else:  # whole tensors and LoRA biases: additive on their difference
            for v, w, t in zip(views, (1.0, op.t, -op.t), match):
                node = apply_terms([t], node, v.raw_input, Ref(v.base_input, name, ref.layer, ref.out_layer),
                                   v.name, w)
    return node
