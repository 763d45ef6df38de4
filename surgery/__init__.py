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
    "load_recipe": "recipe", "Recipe": "recipe", "json_schema": "recipe",
    "build_plan": "plan", "Plan": "plan",
    "run": "execute", "RunResult": "execute",
    "Checkpoint": "checkpoint", "Layout": "layout",
    "SurgeryError": "errors", "RecipeError": "errors",
    "make_demo": "demo",
    "push": "hub", "PushResult": "hub", "write_model_card": "card",
    "run_mergekit": "mergekit_plugin",
    "open_adapter": "adapters", "extract_lora": "lora_extract", "adamergex_adapter": "adapter_merge",
    "evaluate": "eval", "load_datasets": "eval", "evaluate_recipe": "eval", "EvalReport": "eval",
    "search": "search", "load_search": "search.config",
    "diff": "analysis", "DiffResult": "analysis", "save_neuron_set": "analysis_ops", "load_neuron_set": "analysis_ops",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
