"""The adapter card (README.md) written into every adapter folder surgery makes.

    build_adapter_card(config, {"method": "svd", "rank": 16, ...}, name="sw-lora")

Front matter through huggingface_hub's ModelCardData (base_model when the base is a Hub id,
library_name: peft, tags); the body says how the adapter was made and how to load it.
"""

from __future__ import annotations

from pathlib import Path

from surgery.core.model_card import CARD_NAME

AUTO_CLASSES = {"CAUSAL_LM": "AutoPeftModelForCausalLM", "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
                "SEQ_CLS": "AutoPeftModelForSequenceClassification",
                "TOKEN_CLS": "AutoPeftModelForTokenClassification",
                "QUESTION_ANS": "AutoPeftModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction"}
HOW = {"svd": "extracted from the difference between a fine-tune and its base by truncated SVD "
              "(`surgery extract-lora`)",
       "adamergex": "made by AdaMergeX from three adapters (`surgery adamergex`)"}


def build_adapter_card(config: dict, report: dict, *, name: str):
    from huggingface_hub import ModelCard, ModelCardData

    from surgery.io.reference import is_hub_id

    base = config.get("base_model_name_or_path") or ""
    hub_base = base if base and is_hub_id(base) else None
    peft_type = config.get("peft_type", "LORA")
    method = report.get("method", "")
    data = ModelCardData(base_model=hub_base, library_name="peft",
                         tags=list(dict.fromkeys(["model-surgery", peft_type.lower(), method or "adapter"])))
    lines = [f"# {name}", "", f"A PEFT {peft_type} adapter {HOW.get(method, 'written by `surgery`')}.", ""]
    lines.append(f"- base model: {f'[{base}](https://huggingface.co/{base})' if hub_base else f'`{base}`'}")
    if config.get("r") is not None and peft_type == "LORA":
        lines.append(f"- rank: {config['r']}" + (" (per-module ranks in adapter_config.json)"
                                                 if config.get("rank_pattern") else ""))
    lines.append(f"- modules: {', '.join(f'`{m}`' for m in _short(config.get('target_modules')))}")
    details = {k: v for k, v in report.items() if k in ("rank", "energy", "tuned", "mode", "t", "task",
                                                         "target_ref", "source_ref") and v is not None}
    lines += [f"- {k}: {v}" for k, v in details.items()]
    auto = AUTO_CLASSES.get(config.get("task_type") or "", "AutoPeftModel")
    lines += ["", "## Use", "", "```python", f"from peft import {auto}", "",
              f'model = {auto}.from_pretrained("<this repo or folder>")',
              "model = model.merge_and_unload()   # optional: a plain transformers model", "```", ""]
    if method == "svd":
        lines += ["`surgery_extract.json` records the relative reconstruction error ‖ΔW − B·A‖/‖ΔW‖ of "
                  "every module.", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def write_adapter_card(folder, config: dict, report: dict, *, name: str) -> Path:
    path = Path(folder) / CARD_NAME
    build_adapter_card(config, report, name=name).save(path)
    return path


def _short(modules, limit: int = 12) -> list[str]:
    modules = sorted(modules or []) if not isinstance(modules, str) else [modules]
    return modules if len(modules) <= limit else modules[:limit] + [f"… (+{len(modules) - limit})"]
