"""What a user names as a model, resolved in one place for every command (run inputs, diff, eval, probe, search).

    resolve_reference("out/swap")            # Reference(kind="checkpoint", path=.../out/swap)
    resolve_reference("recipes/swap.yaml")   # kind "recipe": its result, built from the plan
    resolve_reference("org/name@main")       # kind "hub": repo_id "org/name", revision "main"
    resolve_reference("x.yaml", kinds=CHECKPOINT)   # error: a recipe where only a checkpoint will do

A local path wins over a Hub id of the same spelling; relative paths are tried against ``base_dir`` (a
recipe's folder) first, then the working directory. A bad reference gets the same one-line message
whichever command was given it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.files import existing_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
CHECKPOINT = ("checkpoint", "hub")                # what a recipe's inputs may name
MODEL = ("checkpoint", "hub", "recipe")          # what diff, eval and probe may name


@dataclass(frozen=True)
class Reference:
    """A resolved model reference: ``kind`` is 'checkpoint' (a local folder or weights file), 'recipe'
    (a recipe file: its result) or 'hub' (a Hub id, fetched through the HF cache when opened)."""

    text: str                      # what the user wrote
    kind: str
    path: Path | None = None       # the local folder or file found (checkpoint, recipe)

    @property
    def repo_id(self) -> str | None:
        return self.text.partition("@")[0] if self.kind == "hub" else None

    @property
    def revision(self) -> str | None:
        return (self.text.partition("@")[2] or None) if self.kind == "hub" else None


def resolve_reference(ref, *, base_dir: Path | None = None, kinds: tuple[str, ...] = MODEL) -> Reference:
    """The local checkpoint, recipe file or Hub id that ``ref`` names; one line naming ``ref`` when it names
    none of ``kinds``."""
    text = str(ref)
    for candidate in local_candidates(text, base_dir):
        if os.path.lexists(candidate):
            existing_path(candidate, text)  # a symlink loop or a dangling link: say so
            is_recipe = candidate.is_file() and candidate.suffix.lower() in RECIPE_SUFFIXES
            found = Reference(text, "recipe" if is_recipe else "checkpoint", Path(os.path.abspath(candidate)))
            if found.kind not in kinds:
                raise SurgeryError(f"{text}: a recipe file, where a checkpoint (a folder, a .safetensors file "
                                   "or a Hub id) is expected")
            return found
    looks_like_recipe = text.lower().endswith(RECIPE_SUFFIXES)  # a missing recipe file, not a Hub repo
    if HUB_ID.match(text) and not text.startswith((".", "/")) and not looks_like_recipe and "hub" in kinds:
        return Reference(text, "hub")
    raise SurgeryError(f"checkpoint not found: {text!r} is neither a local path nor a Hub id "
                       "like 'org/name' or 'org/name@revision'")


def is_hub_id(ref, base_dir: Path | None = None) -> bool:
    """Whether ``ref`` names a Hub repository (and no local path); never raises."""
    try:
        return resolve_reference(ref, base_dir=base_dir).kind == "hub"
    except SurgeryError:
        return False


def local_candidates(text: str, base_dir: Path | None) -> list[Path]:
    p = Path(text).expanduser()
    if p.is_absolute() or base_dir is None:
        return [p]
    return [base_dir / p, p]
