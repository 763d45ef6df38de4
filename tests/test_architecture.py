"""The package's shape: the layers import-linter enforces, no import cycles, modules of one job."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400  # aim for ~350: split a module by job when it grows past that


def test_import_layers_hold():
    """pyproject.toml's [tool.importlinter] contract: cli > pipeline > recipe loader > operations > ... > errors."""
    pytest.importorskip("importlinter")
    r = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports; "
                        "raise SystemExit(lint_imports())"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_no_import_cycles():
    """No two modules import each other, directly or through others (function-local imports count)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("surgery", include_external_packages=False)
    packages = {m for m in graph.modules if (ROOT / m.replace(".", "/") / "__init__.py").exists()}
    cycles = []
    for a in sorted(graph.modules - packages):
        for b in sorted(graph.find_modules_directly_imported_by(a) - packages):
            if graph.chain_exists(importer=b, imported=a):
                cycles.append(" -> ".join(graph.find_shortest_chain(importer=b, imported=a)) + f" -> {b}")
    assert not cycles, "\n".join(cycles)


def test_modules_stay_small():
    """Python modules, C sources and headers, and test files alike: split a file by job past MAX_LINES lines."""
    files = [p for pattern in ("*.py", "*.c", "*.h") for p in (ROOT / "surgery").rglob(pattern)]
    files += list((ROOT / "tests").rglob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in sorted(files) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job (over {MAX_LINES} lines): " + ", ".join(f"{f} ({n})" for f, n in long.items())


def test_every_command_is_registered():
    """Each command module's commands are added to the group, so `python -m surgery.cli --help` lists them all."""
    import click

    import surgery.cli as cli_pkg
    from surgery.cli import cli

    defined = set()
    for path in (ROOT / "surgery" / "cli").glob("*.py"):
        if path.stem == "__main__":
            continue
        module = __import__(f"surgery.cli.{path.stem}", fromlist=["_"]) if path.stem != "__init__" else cli_pkg
        commands = [c for c in vars(module).values() if isinstance(c, click.Command) and c is not cli]
        grouped = {id(s) for g in commands if isinstance(g, click.Group) for s in g.commands.values()}
        defined |= {c.name for c in commands if id(c) not in grouped}  # subcommands come with their group
    assert defined and defined <= set(cli.commands), defined - set(cli.commands)
    r = subprocess.run([sys.executable, "-m", "surgery.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and all(f"  {name}" in r.stdout for name in defined), r.stdout


def test_contributing_lists_the_contract_layers():
    """CONTRIBUTING.md's layer diagram is the import-linter contract, in order (the left column of its block)."""
    import re
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    want = [[m.strip().removeprefix("surgery.") for m in layer.split("|")] for layer in contract]
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = text[text.index("## Layers"):].split("```")[1].strip().splitlines()
    got = [[m.strip() for m in re.split(r"\s{2,}", line)[0].split("|")] for line in block]
    assert got == want
