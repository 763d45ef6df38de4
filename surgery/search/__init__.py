"""`surgery search`: search over recipe values with Optuna, each trial evaluated in memory.

    import surgery
    result = surgery.search("search.yaml", "runs/sw-swap", trials=30)
    result.best_value, result.best_recipe     # a plain recipe dict; runs/sw-swap/best.yaml

Modules: space (search variables), config (search files), genome (mergekit-evolve configs),
study (the Optuna loop, resume), workers (serial or Ray), results (tables, plots, best.yaml).
"""

import sys
import types


def search(search_file, out, **options):
    """Run or resume a search; see ``surgery.search.study.search`` for the options."""
    from surgery.search.study import search as run_search

    return run_search(search_file, out, **options)


class _CallableModule(types.ModuleType):
    """``surgery.search`` is both this package and the function: importing a submodule binds the
    package to ``surgery.search``, so the package itself forwards calls to ``search``."""

    def __call__(self, search_file, out, **options):
        return search(search_file, out, **options)


sys.modules[__name__].__class__ = _CallableModule
