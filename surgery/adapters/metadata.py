"""What an adapter surgery writes says about its base, so that PEFT's auto classes load it.

    task_type(base.config)              # 'CAUSAL_LM' for a *ForCausalLM architecture
    base_reference(base_checkpoint)     # ('HuggingFaceTB/SmolLM2-135M', 'main') or ('/abs/path/base', None)

``peft.AutoPeftModelForCausalLM.from_pretrained(dir)`` needs ``task_type`` (it refuses ``null``) and a
``base_model_name_or_path`` that resolves from wherever the adapter is loaded: a Hub id, or an
absolute path, never the relative name a recipe used.
"""

from __future__ import annotations

from pathlib import Path

# architecture-name suffix -> PEFT task type (peft.TaskType values)
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
              ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
              ("ForQuestionAnswering", "QUESTION_ANS"), ("Model", "FEATURE_EXTRACTION"))


def task_type(config: dict) -> str | None:
    """The PEFT task type of a base model, from its config's ``architectures``; None when unknown."""
    for arch in config.get("architectures") or []:
        if config.get("is_encoder_decoder") and arch.endswith("ForConditionalGeneration"):
            return "SEQ_2_SEQ_LM"
        for suffix, kind in TASK_TYPES:
            if arch.endswith(suffix):
                return kind
    if config.get("model_type") and not config.get("architectures"):
        # a config without architectures (made by hand): a causal LM when transformers has one of its type
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config["model_type"] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return "CAUSAL_LM"
    return None


def base_reference(ck) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) for a base ``TensorSource``: the Hub id for a Hub checkpoint,
    the absolute folder for a local one, the user's reference for anything else (a recipe)."""
    from surgery.io.checkpoint import Checkpoint

    ref = str(ck.ref)
    if not isinstance(ck, Checkpoint):
        return ref, None
    if ck.from_hub:  # the resolver found it on the Hub (surgery.io.reference)
        repo_id, _, revision = ref.partition("@")
        return repo_id, revision or None
    return str(Path(ck.root).resolve()), None


def resolve_base_path(value: str | None, adapter_dir: Path) -> str | None:
    """An adapter config's ``base_model_name_or_path`` made absolute when it names a local folder
    (relative to the working directory, else to the adapter's folder); a Hub id stays as it is."""
    if not value or Path(value).is_absolute():
        return value
    for candidate in (Path(value), Path(adapter_dir) / value):
        if candidate.exists():
            return str(candidate.resolve())
    return value


def base_config(value: str | None) -> dict:
    """config.json of a local base folder, or {} (a Hub id is not fetched to read it)."""
    import json

    if value and (Path(value) / "config.json").is_file():
        try:
            return json.loads((Path(value) / "config.json").read_text())
        except ValueError:
            return {}
    return {}
