"""The output's layer list: which input and source layer gives each output layer.

Operations pair layers by index, so every input they read must have the recipient's depth unless
the recipe's ``stack`` says which layers line up (``check_depths``); ``stack_layers`` turns the
stack into the per-output-layer maps the planner uses.
"""

from __future__ import annotations

from surgery.core.layout import Layout
from surgery.io.checkpoint import TensorSource
from surgery.recipe.parsing import parse_layers
from surgery.recipe.schema import Recipe


def check_depths(recipe: Recipe, inputs: dict[str, TensorSource], layout: Layout, n_src: int) -> None:
    """Operations pair layers by index: an input of another depth needs a ``stack`` that maps its layers."""
    used = dict.fromkeys(n for op in recipe.operations for names in op.input_refs().values() for n in names)
    for name in used:
        ck = inputs.get(name)
        if ck is None or name == recipe.recipient_name:
            continue
        n = layout.num_layers(ck.keys(), ck.config)
        if n != n_src:
            raise recipe.error(("inputs", name), f"input {name!r} has {n} layers but the recipient "
                               f"{recipe.recipient_name!r} has {n_src}; operations pair layers by index, so map "
                               f"them explicitly with a 'stack' (e.g. stack: [{{layers: '0-{n_src - 1}', "
                               f"sources: {{{name}: '{max(0, n - n_src)}-{n - 1}'}}}}])")


def stack_layers(recipe: Recipe, inputs: dict[str, TensorSource], layout: Layout, n_src: int):
    """Output layer -> (source layer, input giving it, {other input: its source layer})."""
    recipient = recipe.recipient_name
    if not recipe.stack:
        return list(range(n_src)), [recipient] * n_src, [{} for _ in range(n_src)]

    def indices(spec, name, path):
        ck = inputs[name]
        n = n_src if name == recipient else layout.num_layers(ck.keys(), ck.config)
        try:
            return parse_layers(spec, n) if not isinstance(spec, list) else \
                [j for item in spec for j in parse_layers(item, n)]
        except ValueError as e:
            raise recipe.error(path, f"{e} (input {name!r})" if name != recipient else str(e)) from None

    layer_map, layer_from, layer_sources = [], [], []
    for i, seg in enumerate(recipe.stack):
        src = seg.from_ or recipient
        own = indices(seg.layers, src, ("stack", i, "layers"))
        others = {}
        for name, spec in (seg.sources or {}).items():
            others[name] = indices(spec, name, ("stack", i, "sources", name))
            if len(others[name]) != len(own):
                raise recipe.error(("stack", i, "sources", name), f"{len(others[name])} layers, but 'layers' "
                                   f"has {len(own)}; each output layer needs one source layer per input")
        for k, j in enumerate(own):
            layer_map.append(j)
            layer_from.append(src)
            layer_sources.append({n: o[k] for n, o in others.items() if n != src})
    return layer_map, layer_from, layer_sources
