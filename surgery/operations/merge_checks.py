"""Checks of a merge's inputs and parameters against mergekit's rules (what it refuses, what it ignores)."""

from __future__ import annotations


def all_parameter_names() -> set[str]:
    """Every parameter name some registered merge method takes."""
    from mergekit import merge_methods

    return {p.name for m in merge_methods.registered_methods() for p in m.spec.parameters}


def check_architectures(ctx, names: list[str]) -> None:
    """Merged inputs (and the recipient, and the models a stack takes layers from) share one architecture
    (mergekit refuses others without --allow-crimes)."""
    stacked = [seg.from_ for seg in ctx.recipe.stack or [] if seg.from_]  # a frankenmerge's other models
    archs = {}
    for m in dict.fromkeys([ctx.recipient, *names, *stacked]):
        cfg = getattr(ctx.inputs[m], "config", None) or {}  # a plan's result (PlanReader) has no config
        arch = (cfg.get("architectures") or [cfg.get("model_type")])[0]
        if arch:
            archs[m] = arch
    if len(set(archs.values())) > 1:
        shown = ", ".join(f"{m} is {a}" for m, a in archs.items())
        raise ctx.error(("models",), f"the merged models have different architectures ({shown}); a merge "
                                     "combines tensors of one architecture (mergekit refuses this too, "
                                     "unless --allow-crimes)")
