"""The model card (README.md) that `surgery run` writes into every output.

    write_model_card("out/merged", plan, recipe.to_yaml())

Front matter is what huggingface_hub's ModelCardData writes (base_model, base_model_relation: merge,
library_name, tags), rendered without importing huggingface_hub; the body embeds the recipe, a
per-layer provenance table from the plan and any analysis plot (PNG) found in the folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from surgery.io.checkpoint import Checkpoint

CARD_NAME = "README.md"


def hub_base_models(plan) -> list[str]:
    """Hub ids (without @revision) of the plan's inputs that came from the Hub, in recipe order."""
    ids = []
    for ck in plan.inputs.values():
        if not (isinstance(ck, Checkpoint) and ck.from_hub):  # the resolver found it on the Hub (io.reference)
            continue
        repo_id = str(ck.ref).partition("@")[0]
        if repo_id not in ids:
            ids.append(repo_id)
    return ids


def card_tags(plan) -> list[str]:
    names = [op.op_name for op in plan.recipe.operations]
    uses_mergekit = "merge" in names
    tags = ["merge", "model-surgery", *names] + (["mergekit"] if uses_mergekit else [])
    return list(dict.fromkeys(tags))


def build_model_card(plan, recipe_text: str, *, name: str | None = None, plots: list[str] = ()):
    """A huggingface_hub ModelCard for ``plan``; ``plots`` are PNG paths relative to the card."""
    from huggingface_hub import ModelCard

    return ModelCard(model_card_text(plan, recipe_text, name=name, plots=plots))


def model_card_text(plan, recipe_text: str, *, name: str | None = None, plots: list[str] = ()) -> str:
    """The card's text, front matter included: what ``ModelCard(text).save`` writes, without importing
    huggingface_hub (its Hub client is 0.3 s of every run's start-up, its card module 50 ms)."""
    recipe = plan.recipe
    lines = [f"# {name or 'Merged model'}", ""]
    lines += [recipe.description.strip(), ""] if recipe.description else []
    lines += ["This checkpoint was made with `surgery` (model surgery at the safetensors level) "
              "from these inputs:", ""]
    hub = set(hub_base_models(plan))
    for input_name, ck in plan.inputs.items():
        ref = str(ck.ref)
        where = f"[{ref}](https://huggingface.co/{ref.partition('@')[0]})" if ref.partition("@")[0] in hub \
            else "a local checkpoint"
        roles = [r for r, n in (("recipient", plan.recipient), ("config", plan.config_source)) if n == input_name]
        role = f" ({', '.join(roles)})" if roles else ""
        lines.append(f"- `{input_name}`: {where}{role}")
    lines += ["", "## Recipe", "", _fence(recipe_text, "yaml"), ""]
    lines += ["## Provenance", "",
              "Where each output layer comes from (`surgery plan` shows the same per tensor).", ""]
    lines += provenance_table(plan)
    if plots:
        lines += ["", "## Analysis", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", "Files: `surgery_recipe.yaml` is the recipe above; `surgery_manifest.json` records the "
                  "input file hashes, the tool version and the full per-tensor plan.", ""]
    return f"---\n{front_matter(hub_base_models(plan), card_tags(plan))}\n---\n\n" + "\n".join(lines)


def front_matter(base_models: list[str], tags: list[str]) -> str:
    """``ModelCardData(base_model=base_models or None, library_name="transformers", tags=tags,
    base_model_relation="merge").to_yaml()``: its key order, None dropped, dumped as huggingface_hub dumps
    (``yaml.dump(allow_unicode=True, sort_keys=False)``); tests compare the two."""
    import yaml

    data = {"base_model": list(base_models) or None, "library_name": "transformers",
            "tags": list(dict.fromkeys(tags)), "base_model_relation": "merge"}
    return yaml.dump({k: v for k, v in data.items() if v is not None}, allow_unicode=True, sort_keys=False).strip()


def write_model_card(folder: str | Path, plan, recipe_text: str, *, name: str | None = None) -> Path:
    """Write README.md into ``folder`` (the output of ``plan``); return its path."""
    folder = Path(folder)
    plots = sorted(p.name for p in folder.glob("*.png"))
    path = folder / CARD_NAME
    with open(path, "w", newline="", encoding="utf-8") as f:  # as ModelCard.save writes it
        f.write(model_card_text(plan, recipe_text, name=name or folder.name, plots=plots))
    return path


def provenance_table(plan) -> list[str]:
    """Markdown table rows: consecutive layers with the same sources share a row."""
    rows = []  # [label, first, last, sources-text]
    for row in plan.layer_summary():
        layer = row["layer"]
        sources = "<br>".join(_source(s) for s in row["sources"])
        if layer is None:
            rows.append([row["position"].replace("_", " "), None, None, sources])
            continue
        remapped = row["source_layer"] != layer
        label = f"{layer} (from {row['source_layer']})" if remapped else str(layer)
        prev = rows[-1] if rows else None
        if prev and prev[2] is not None and prev[2] == layer - 1 and prev[3] == sources and not remapped \
                and "from" not in prev[0]:
            prev[2] = layer
            prev[0] = f"{prev[1]}-{layer}"
        else:
            rows.append([label, None if remapped else layer, None if remapped else layer, sources])
    out = ["| layers | from |", "|---|---|"]
    out += [f"| {label} | {sources} |" for label, _, _, sources in rows]
    return out


def _source(s: dict) -> str:
    mods = "" if s["modules"] == "all" else f"{', '.join(s['modules'])}: "
    detail = s["rule"] + (f", {s['note']}" if s["note"] else "")
    return _cell(f"{mods}{s['from']} ({detail})")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fence(text: str, lang: str) -> str:
    """A code block whose fence is longer than any backtick run inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"
