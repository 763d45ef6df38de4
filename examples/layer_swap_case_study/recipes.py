"""The models of the table, as `surgery` recipes over the experts (plain dicts; paths are absolute).

Every merge and swap is a recipe that `surgery eval` builds in memory; nothing here computes weights.
Parameters are fixed before any result is seen (the paper's and the libraries' usual values), not tuned.
"""

from __future__ import annotations


def _recipe(inputs: dict, recipient: str, *operations: dict) -> dict:
    return {"inputs": {k: str(v) for k, v in inputs.items()}, "recipient": recipient,
            "operations": list(operations)}


def ranked_swap(models: dict, k: int, transition: int) -> dict:
    """The analysis-chosen swap: the k layers where the language expert moved most from the base
    (`surgery diff`'s relative change), split between bottom and top (``split: outer``), into the math
    expert."""
    return _recipe({"math": models["math"], "german": models["german"], "base": models["base"]}, "math",
                   {"ranked_layer_swap": {"donor": "german", "reference": "base", "k": k, "split": "outer",
                                          "transition": transition}})


def hand_swap(models: dict, bottom: int, top: int, transition: int) -> dict:
    """Bandarkar et al.'s swap: the language expert's bottom and top layers into the math expert."""
    return _recipe({"math": models["math"], "german": models["german"]}, "math",
                   {"layer_swap": {"donor": "german", "bottom": bottom, "top": top, "transition": transition}})


def search_space(models: dict, max_bottom: int, max_top: int) -> dict:
    """The recipe of `surgery search`: the same swap with (bottom, top, transition) as search variables."""
    return _recipe({"math": models["math"], "german": models["german"]}, "math",
                   {"layer_swap": {"donor": "german", "bottom": {"int": [0, max_bottom]},
                                   "top": {"int": [0, max_top]}, "transition": {"choice": [0, 1, 2]}}})


def baselines(models: dict) -> dict[str, dict]:
    """Standard merges of the same two experts, and AdaMergeX-style arithmetic."""
    two = {"math": models["math"], "german": models["german"]}
    three = dict(two, base=models["base"])
    return {
        "linear (0.5/0.5)": _recipe(two, "math", {"blend": {"weights": {"math": 1, "german": 1}}}),
        "TIES (density 0.5)": _recipe(three, "math", {"merge": {
            "method": "ties", "base": "base", "models": {"math": {"weight": 1.0, "density": 0.5},
                                                         "german": {"weight": 1.0, "density": 0.5}}}}),
        "task arithmetic (λ=1)": _recipe(three, "math", {"arithmetic": {
            "expr": "base + 1.0*(math - base) + 1.0*(german - base)"}}),
        "AdaMergeX (math + german − english)": _recipe(
            dict(two, english=models["english"]), "math", {"arithmetic": {"expr": "math + 1.0*(german - english)"}}),
    }


def zero_neurons(base, neuron_file) -> dict:
    """The base with one language's LAPE neurons set to zero (the masking check of Tang et al. 2024)."""
    return _recipe({"base": base}, "base", {"reset_neurons": {"to": "zero", "neurons": {"file": str(neuron_file)}}})
