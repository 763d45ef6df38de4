"""surgery: model surgery on LLM checkpoints at the safetensors level.

    import surgery
    recipe = surgery.load_recipe("recipes/layer_swap.yaml")
    plan = surgery.build_plan(recipe)          # what `surgery plan` shows
    print(plan.format())
    result = surgery.run(recipe, "out/")       # what `surgery run` does

Attributes are imported on first use, so ``import surgery`` stays fast.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_recipe": "loader", "json_schema": "loader", "Recipe": "recipe.schema",
    "build_plan": "pipeline", "run": "pipeline", "RunResult": "pipeline", "open_source": "pipeline",
    "extract_lora": "pipeline", "Plan": "core.plan",
    "Checkpoint": "io.checkpoint", "TensorSource": "io.checkpoint", "Layout": "core.layout",
    "SurgeryError": "errors", "RecipeError": "errors",
    "make_demo": "demo",
    "push": "io.hub", "PushResult": "io.hub", "write_model_card": "core.model_card",
    "run_mergekit": "mergekit.runner",
    "open_adapter": "adapters.view", "adamergex_adapter": "adapters.adamergex",
    "load_model": "models",
    "evaluate": "eval.api", "evaluate_recipe": "eval.api", "load_datasets": "eval.data", "EvalReport": "eval.scores",
    "diff": "analysis.diff", "DiffResult": "analysis.diff",
    "save_neuron_set": "analysis.neuron_set", "load_neuron_set": "analysis.neuron_set",
    "set_threads": "core.threads",
    "search": "search", "load_search": "search.config",
    "probe": "probing", "ProbeResult": "probing",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
