"""The parts of a mergekit config that are not merges: model references, dtypes, the tokenizer and
chat template, keys mergekit ignores, and configs for mergekit's other commands (mergekit-moe).

    model_ref("org/base+org/lora")             # ('org/base', 'org/lora')
    model_ref({"model": {"path": "x", "revision": "v1"}})   # ('x@v1', None)
"""

from __future__ import annotations

from typing import Any

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
    "out_path": "'out_path' names a stage of a multi-document config (examples/mega.yml); a single config "
                "ignores it",
}

TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")

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


def translate_tokenizer(tr, recipe: dict, base) -> None:
    """``tokenizer`` / ``tokenizer_source`` / ``chat_template`` -> the recipe's keys of the same names
    (``tr`` is the translator: surgery.mergekit.config)."""
    d = tr.data
    if d.get("tokenizer") is not None and d.get("tokenizer_source") is not None:
        raise tr.error(("tokenizer",), "give either 'tokenizer' or 'tokenizer_source', not both "
                         "(mergekit: 'Cannot specify both tokenizer_source and tokenizer')")
    tok, path = d.get("tokenizer_source"), ("tokenizer_source",)
    section: dict = {}
    if d.get("tokenizer") is not None:
        section = tr.check_keys(d["tokenizer"], TOKENIZER_KEYS, ("tokenizer",), "the tokenizer section")
        tok, path = section.get("source", "union"), ("tokenizer", "source")
    if tok is not None:
        out: dict[str, Any] = {"source": _tokenizer_source(tr, tok, path)}
        if base:
            out["base"] = base
        if section.get("pad_to_multiple_of") is not None:
            out["pad_to_multiple_of"] = section["pad_to_multiple_of"]
        if section.get("tokens"):
            out["tokens"] = _tokens(tr, section["tokens"])
        recipe["tokenizer"] = out
    if d.get("chat_template") is not None:
        try:
            recipe["chat_template"] = check_chat_template(d["chat_template"])
        except ValueError as e:
            raise tr.error(("chat_template",), str(e)) from None

def _tokenizer_source(tr, tok, path: tuple) -> str:
    if tok in ("union", "base"):
        return tok
    try:
        model, lora = model_ref(tok)
    except ValueError as e:
        raise tr.error(path, str(e)) from None
    key = model + (f"+{lora}" if lora else "")
    if key not in tr.names:  # mergekit loads any model's tokenizer; surgery wants it among the inputs
        raise tr.error(path, f"tokenizer_source {tok!r} is not one of the config's models "
                         f"({', '.join(tr.names)}), 'base' or 'union'")
    return tr.names[key]

def _tokens(tr, tokens) -> dict:
    if not isinstance(tokens, dict):
        raise tr.error(("tokenizer", "tokens"), "tokens must be a mapping of token -> {source, force}")
    out = {}
    for token, spec in tokens.items():
        path = ("tokenizer", "tokens", token)
        spec = tr.check_keys(spec if spec is not None else {}, TOKEN_KEYS, path, "a token entry")
        entry: dict[str, Any] = {"force": spec.get("force", False)}
        src = spec.get("source")
        if isinstance(src, dict) and src.get("kind") == "zero":
            entry["source"] = {"kind": "zero"}
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            tr.require(src, "model", path + ("source",))
            entry["source"] = {**src, "model": tr.model(src["model"], path + ("source", "model"))}
        elif src is not None:
            entry["source"] = tr.model(src, path + ("source",))
        out[str(token)] = entry
        tr.path_map[("tokenizer", "tokens", str(token))] = path
    return out
