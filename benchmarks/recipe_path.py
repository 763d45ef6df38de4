"""The path a recipe takes through surgery's modules during one `surgery run` (issue 22: "a recipe's path is shorter").

    python benchmarks/recipe_path.py RECIPE [--out DIR]

Runs the recipe in this process (the demo checkpoints by default) with a profiler hook that records, for every
Python call made from a surgery module into a surgery module, the module called. Prints:
  modules      how many distinct surgery modules the run calls into;
  entries      how many times control enters a module from another one (calls between modules);
  climbs back  how many of those calls go UP the import layers (pyproject's import-linter contract): a lower
               layer calling back into a higher one (core's planner calling each operation's plan(), say), and
               which (caller -> callee) module pairs do it;
  repeats      how many times the recipe file is read, and how many times `check_target`, `input_paths`,
               `load_recipe` and `parse_size` run.
Checkpoint I/O (io.*) is counted like any module. No timings: the numbers are counts of calls.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layer_of(module: str, layers: list[list[str]]) -> int:
    if module == "surgery":  # the package: `surgery.run` and friends, the API's top
        return -1
    for i, group in enumerate(layers):
        if any(module == g or module.startswith(g + ".") for g in group):
            return i
    return len(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "layer_swap.yaml"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import surgery
    from surgery.demo import make_demo

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    layers = [[m.strip() for m in layer.split("|")] for layer in contract]
    if not (ROOT / "demo" / "checkpoints").is_dir():
        make_demo(ROOT / "demo" / "checkpoints")
    out = Path(args.out or tempfile.mkdtemp()) / "out"

    entries, climbs, modules, reads, checks = 0, 0, set(), 0, 0
    up: dict[tuple[str, str], int] = {}
    calls: dict[str, int] = {}

    def hook(frame, event, arg):
        nonlocal entries, climbs, reads, checks
        if event != "call":
            return
        mod = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        name = frame.f_code.co_name
        if mod.startswith("surgery"):
            reads += name == "read_text" and mod == "surgery.io.files"
            checks += name == "check_target"
            calls[name] = calls.get(name, 0) + 1
        if not mod.startswith("surgery") or not caller.startswith("surgery") or mod == caller:
            return
        modules.add(mod)
        entries += 1
        if layer_of(mod, layers) < layer_of(caller, layers):
            climbs += 1
            up[(caller, mod)] = up.get((caller, mod), 0) + 1

    sys.setprofile(hook)
    try:
        surgery.run(args.recipe, out, force=True)
    finally:
        sys.setprofile(None)
    print(f"recipe       {args.recipe}")
    print(f"modules      {len(modules)}")
    print(f"entries      {entries}")
    print(f"climbs back  {climbs}: " + ", ".join(f"{a} -> {b} x{n}" for (a, b), n in sorted(up.items())))
    print(f"file reads   {reads} (recipe and JSON files through io.files.read_text)")
    print(f"check_target {checks}, input_paths {calls.get('input_paths', 0)}, load_recipe "
          f"{calls.get('load_recipe', 0)}, parse_size {calls.get('parse_size', 0)}")


if __name__ == "__main__":
    main()
