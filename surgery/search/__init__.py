"""`surgery search`: search over recipe values with Optuna, each trial evaluated in memory.

    import surgery
    result = surgery.search("search.yaml", "runs/sw-swap", trials=30)
    result.best_value, result.best_recipe     # a plain recipe dict; runs/sw-swap/best.yaml

Modules: space (search variables), config (search files), genome (mergekit-evolve configs),
study (the Optuna loop, resume), workers (serial or Ray), results (tables, plots, best.yaml).
"""
