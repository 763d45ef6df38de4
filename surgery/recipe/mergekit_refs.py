"""The parts of a mergekit config that are not merges: model references, dtypes, the tokenizer and
chat template, keys mergekit ignores, and configs for mergekit's other commands (mergekit-moe).

    model_ref("org/base+org/lora")             # ('org/base', 'org/lora')
    model_ref({"model": {"path": "x", "revision": "v1"}})   # ('x@v1', None)
"""

from __future__ import annotations

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
          "torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}

# mergekit's MergeConfiguration drops unknown top-level keys; published configs carry these
# (parameters written at the top level, or options of older mergekit versions). They change
# nothing in mergekit 0.1.5, so surgery warns instead of failing on them.
IGNORED_TOP = {
    "int8_mask": "mergekit reads int8_mask only under 'parameters'",
    "normalize": "mergekit reads normalize only under 'parameters'",
    "rescale": "mergekit reads rescale only under 'parameters'",
    "lambda": "mergekit reads lambda only under 'parameters'",
    "density": "mergekit reads density only under 'parameters' or per model",
    "weight": "mergekit reads weight only under 'parameters' or per model",
    "t": "mergekit reads t only under 'parameters'",
    "epsilon": "mergekit reads epsilon only under 'parameters' or per model",
    "name": "'name' names a stage of a multi-stage config (mergekit-multi); a single config ignores it",
}

# keys that mark a config for mergekit-moe (mergekit/moe/config.py: MoEMergeConfig)
MOE_KEYS = ("experts", "gate_mode", "experts_per_token", "shared_experts", "architecture")


def is_moe_config(data) -> bool:
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


MOE_MESSAGE = ("this is a mergekit-moe config (it has 'experts'): it builds a mixture-of-experts model, a new "
               "architecture whose router weights mergekit-moe computes by running the base model over the "
               "experts' positive/negative prompts (gate_mode hidden) or from token embeddings; surgery merges "
               "tensors of one architecture and does not build MoE models. Run it with `mergekit-moe`")


def model_ref(ref) -> tuple[str, str | None]:
    """A mergekit ModelReference (string 'model[@rev][+lora[@rev]]' or mapping) -> (model, lora or None).

    Raises ValueError with a sentence when the reference is not one."""
    if isinstance(ref, dict):
        extra = set(ref) - {"model", "lora", "override_architecture"}
        if extra or "model" not in ref:
            raise ValueError("a model reference mapping has 'model' (and optionally 'lora'); got keys "
                             + ", ".join(map(str, ref)))
        if ref.get("override_architecture"):
            raise ValueError("override_architecture is not supported: surgery reads the architecture "
                             "from each model's config.json")
        model, lora = _path(ref["model"]), ref.get("lora")
        return model, (_path(lora) if lora is not None else None)
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"expected a model path or Hub id (got {ref!r})")
    parts = ref.split("+")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"a model reference is 'model' or 'model+lora' (got {ref!r})")
    return parts[0], (parts[1] if len(parts) == 2 else None)


def _path(value) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("path"), str) and set(value) <= {"path", "revision"}:
        return value["path"] + (f"@{value['revision']}" if value.get("revision") else "")
    raise ValueError(f"a model path is a string or {{path, revision}} (got {value!r})")


CHAT_TEMPLATE_HELP = ("a built-in name (alpaca, chatml, exaone, llama3, mistral), 'auto' (the template most "
                      "input models share), or a Jinja template")


def check_chat_template(value) -> str:
    """mergekit's rule (merge.py _set_chat_template): a built-in name, 'auto', or a literal template."""
    import importlib.resources

    if not isinstance(value, str) or not value:
        raise ValueError(f"chat_template is {CHAT_TEMPLATE_HELP} (got {value!r})")
    if value == "auto":
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value:
        from mergekit._data import chat_templates  # a data package: importing it loads nothing else

        if importlib.resources.files(chat_templates).joinpath(value + ".jinja").is_file():
            return value
    if len(value) < 20 or "{" not in value:
        from surgery.errors import did_you_mean

        names = ["alpaca", "chatml", "exaone", "llama3", "mistral", "auto"]
        raise ValueError(f"unknown chat template {value!r}" + did_you_mean(value, names)
                         + f" (chat_template is {CHAT_TEMPLATE_HELP})")
    return value
