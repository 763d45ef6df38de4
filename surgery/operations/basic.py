"""The basic operations: layer_swap, arithmetic, take, blend.

Each operation is one class: its recipe fields (pydantic), its name in recipes and its planner.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import ConfigDict, Field

from surgery.core.graph import linear
from surgery.core.plan import Context, Entry
from surgery.recipe.parsing import LayerSpec, parse_expression
from surgery.recipe.schema import Operation, Select, Source


def swap_weights(n_layers: int, swapped: list[int], transition: int) -> dict[int, float]:
    """Donor weight per layer: 1 inside swapped blocks, ramping 1 - d/(t+1) at distance d <= t."""
    weights = {i: 1.0 for i in swapped}
    if swapped and transition:
        for i in range(n_layers):
            if i in weights:
                continue
            d = min(abs(i - s) for s in swapped)
            if d <= transition:
                weights[i] = 1.0 - d / (transition + 1)
    return weights


class LayerSwap(Operation):
    """Bandarkar et al. 2024: the recipient receives its bottom/top layers from a donor."""

    op_name: ClassVar[str] = "layer_swap"

    donor: str = Field(description="Input that gives the swapped layers.")
    bottom: int = Field(0, ge=0, description="Number of bottom layers taken from the donor: output layers 0..bottom-1.")
    top: int = Field(0, ge=0, description=(
        "Number of top layers taken from the donor, counted from the output's last layer (the recipient's, unless "
        "'stack' rebuilds them); the donor gives its layers of the same index (a donor of another depth needs a "
        "'stack' that maps them)."))
    layers: LayerSpec | None = Field(None, description="Explicit donor layers instead of bottom/top: '0-3, 28-31'.")
    transition: int = Field(0, ge=0, description=(
        "Width of the blend zone next to each swapped block. Layer at distance d gets donor weight 1 - "
        "d/(transition+1)."))
    embeddings: Source = Field("recipient", description=(
        "Embeddings from recipient, donor, or a float = donor weight in a blend."))
    final_norm: Source = Field("recipient", description="Final norm: recipient, donor, or donor weight.")
    lm_head: Source = Field("recipient", description="lm_head: recipient, donor, or donor weight.")

    def input_refs(self):
        return {"donor": [self.donor]}

    def plan(self, ctx: Context) -> None:
        n = ctx.n_layers
        if self.layers is not None:
            if self.bottom or self.top:
                raise ctx.error(("layers",), "give either 'layers' or 'bottom'/'top', not both")
            swapped = ctx.layers(self.layers, ("layers",))
        else:
            if self.bottom + self.top > n:
                raise ctx.error(("top",), f"layer out of range: bottom {self.bottom} + top {self.top} layers exceed "
                                          f"the model's {n} layers")
            if self.bottom + self.top == 0:
                raise ctx.error((), "nothing to swap: set 'bottom', 'top' or 'layers'")
            swapped = list(range(self.bottom)) + list(range(n - self.top, n))
        weights = swap_weights(n, swapped, self.transition)
        donor, recipient = self.donor, ctx.recipient

        def blend(e: Entry, w: float, note: str):
            if w == 1.0:
                ctx.assign(e, ctx.ref(donor, e), note)
            elif w > 0.0:
                ctx.assign(e, linear([(w, ctx.ref(donor, e)), (1.0 - w, ctx.ref(recipient, e))]), note)

        outer = {"embed": self.embeddings, "final_norm": self.final_norm, "lm_head": self.lm_head}
        present = set()
        for e in ctx.entries:
            layer = e.info.layer
            if layer is not None:
                if layer in weights:
                    blend(e, weights[layer], "swapped" if weights[layer] == 1.0 else "transition")
                continue
            kind = e.info.kind
            if kind == "norm" and "embed" in e.name.lower():
                kind = "embed"  # e.g. BERT's embeddings.LayerNorm travels with the embeddings
            present.add(kind)
            choice = outer.get(kind, "recipient")
            if choice == "donor":
                blend(e, 1.0, "")
            elif isinstance(choice, float):
                if not 0.0 <= choice <= 1.0:
                    field = {"embed": "embeddings"}.get(kind, kind)
                    raise ctx.error((field,), f"donor weight must be between 0 and 1, got {choice}")
                blend(e, choice, "blend")
        for kind, choice in outer.items():
            if choice != "recipient" and choice != 0.0 and kind not in present and not ctx.partial:
                field = {"embed": "embeddings"}.get(kind, kind)
                if kind == "lm_head" and ctx.tied_lm_head():
                    raise ctx.error((field,), f"{field}: {choice} changes nothing: this model ties lm_head to the "
                                              "embeddings (tie_word_embeddings), so it has no lm_head tensor; "
                                              f"use embeddings: {choice} to change both")
                raise ctx.error((field,), f"{field}: {choice} changes nothing: the model has no {kind} tensor")


class Arithmetic(Operation):
    """A weighted linear combination of inputs: 'math + 1.0*(sw - en)'."""

    op_name: ClassVar[str] = "arithmetic"

    expr: str = Field(description="Expression over input names with +, -, scalar * and /, parentheses.")
    select: Select | None = None

    def input_refs(self):
        try:
            return {"expr": list(parse_expression(self.expr))}
        except ValueError:
            return {}  # reported with its line by the planner

    def plan(self, ctx: Context) -> None:
        try:
            coeffs = parse_expression(self.expr)
        except ValueError as ex:
            raise ctx.error(("expr",), str(ex)) from None
        for e in ctx.select(self.select):
            ctx.assign(e, linear([(c, ctx.ref(n, e)) for n, c in coeffs.items()]))


class Take(Operation):
    """Copy the selected tensors from one input, byte for byte."""

    op_name: ClassVar[str] = "take"

    from_: str = Field(alias="from", description="Input to copy from.")
    select: Select | None = None
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def input_refs(self):
        return {"from": [self.from_]}

    def plan(self, ctx: Context) -> None:
        for e in ctx.select(self.select):
            ctx.assign(e, ctx.ref(self.from_, e))


class Blend(Operation):
    """Weighted average of inputs on the selected tensors."""

    op_name: ClassVar[str] = "blend"

    weights: dict[str, float] = Field(description="Input name -> weight.")
    normalize: bool = Field(True, description="Divide by the sum of weights.")
    select: Select | None = None

    def input_refs(self):
        return {"weights": list(self.weights)}

    def plan(self, ctx: Context) -> None:
        total = sum(self.weights.values())
        if self.normalize and total == 0:
            raise ctx.error(("weights",), "weights sum to 0; cannot normalize (set normalize: false)")
        scale = 1.0 / total if self.normalize else 1.0
        for e in ctx.select(self.select):
            ctx.assign(e, linear([(w * scale, ctx.ref(n, e)) for n, w in self.weights.items()]))
