"""Vocabulary surgery: the output tokenizer and re-indexed embedding / lm_head rows (mergekit's
``tokenizer:`` section, ``tokenizer_source`` and ``chat_template``), inside the one plan.

    tokenizer: {source: union, tokens: {"<|im_start|>": {source: chat_model}}, pad_to_multiple_of: 64}

The output vocabulary is built by mergekit's own ``build_tokenizer`` (union of the inputs'
tokens, the base's, or one input's), once per plan. Every vocabulary tensor (embeddings and
lm_head) is merged by a ``mergekit`` node whose params carry that vocabulary: before the merge,
each input's tensor is re-indexed to it by mergekit's ``PermutedVocabulary`` (rows by token,
rows of tokens an input lacks from the one input that has them, the base's, or their mean),
so the bytes are mergekit's, and the tensor streams like every other one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

VOCAB_KINDS = ("embed", "lm_head")  # layout kinds whose rows are tokens (mergekit: vocabulary_axis 0)


@dataclass(eq=False)
class Vocabulary:
    """The output vocabulary of a plan and what re-indexing an input needs."""

    info: object                      # mergekit.tokenizer.TokenizerInfo (tokenizer, permutations, vocabs)
    refs: dict[str, object]           # input name -> mergekit ModelReference
    tokens: dict = field(default_factory=dict)  # token -> mergekit TokenEmbeddingConfig
    pad_to_multiple_of: int | None = None

    @property
    def rows(self) -> int:
        n = len(self.info.tokenizer.get_vocab())
        m = self.pad_to_multiple_of
        return n if not m or n % m == 0 else (n // m + 1) * m

    def describe(self) -> str:
        return f"rows re-indexed to the {self.rows}-token output vocabulary"


def vocabulary(ctx) -> Vocabulary | None:
    """The plan's output vocabulary (built once per recipe and inputs), or None without a tokenizer."""
    recipe = ctx.recipe
    if recipe.tokenizer is None:
        return None
    key = tuple(id(ck) for ck in ctx.inputs.values())
    if recipe._vocabulary is None or recipe._vocabulary[0] != key:
        from surgery.io.output import TOKENIZER_FILES

        for name in recipe.inputs:
            root = ctx.inputs[name].root
            if not any((root / f).is_file() for f in TOKENIZER_FILES if f != "chat_template.jinja"):
                raise recipe.error(("inputs", name), f"the tokenizer section needs every model's tokenizer, and "
                                                     f"{name!r} has no tokenizer files in {root}")
        try:
            recipe._vocabulary = (key, _build(recipe, ctx.inputs))
        except Exception as e:  # noqa: BLE001 - transformers/mergekit errors, said in one line
            first = str(e).strip().splitlines()
            raise recipe.error(("tokenizer",), f"cannot build the output tokenizer: {type(e).__name__}: "
                                               f"{first[0] if first else e}") from None
    return recipe._vocabulary[1]


def _build(recipe, inputs) -> Vocabulary:
    from mergekit.common import ModelPath, ModelReference
    from mergekit.tokenizer.build import build_tokenizer
    from mergekit.tokenizer.config import ModelTokenEmbedding, TokenEmbeddingConfig, ZeroEmbedding

    from surgery.recipe.schema import AdapterInput

    spec = recipe.tokenizer
    refs = {}
    for name, src in recipe.inputs.items():
        model = ModelPath(path=str(inputs[name].root))
        lora = ModelPath(path=src.adapter) if isinstance(src, AdapterInput) else None  # as mergekit: base+lora
        refs[name] = ModelReference(model=model, lora=lora)
    base = spec.base or recipe.recipient_name
    order = [base] + [n for n in recipe.inputs if n != base]  # mergekit: the base's tokens come first
    source = spec.source if spec.source in ("union", "base") else refs[spec.source]
    tokens = {}
    for token, cfg in (spec.tokens or {}).items():
        src = cfg.source
        if src is None:
            out = None
        elif isinstance(src, str):
            out = refs[src]
        elif src.kind == "zero":
            out = ZeroEmbedding(kind="zero")
        else:
            out = ModelTokenEmbedding(kind="model_token", model=refs[src.model], token_id=src.token_id,
                                      token=src.token)
        tokens[token] = TokenEmbeddingConfig(source=out, force=cfg.force)
    info = build_tokenizer(base_model=refs[base], referenced_models=[refs[n] for n in order],
                           tokenizer_source=source, trust_remote_code=False, add_tokens=list(tokens))
    return Vocabulary(info, refs, tokens, spec.pad_to_multiple_of)


def vocab_params(ctx, entry, base: str | None) -> dict:
    """Params a mergekit node over a vocabulary tensor adds (nothing for other tensors)."""
    if ctx.recipe.tokenizer is None or entry.info.kind not in VOCAB_KINDS:
        return {}
    vocab = vocabulary(ctx)
    return {"vocab": vocab, "vocab_base": base, "reshapes": True}


def permute(tensors: list, names: list[str], p: dict) -> list:
    """Each input's tensor re-indexed to the output vocabulary: mergekit's PermutedVocabulary, as is."""
    from mergekit.tokenizer.embed import PermutedVocabulary

    vocab: Vocabulary = p["vocab"]
    base = vocab.refs[p["vocab_base"]] if p.get("vocab_base") else None
    task = PermutedVocabulary.model_construct(tokens=dict(vocab.tokens), pad_to_multiple_of=vocab.pad_to_multiple_of,
                                              base_model=base, vocabulary_axis=0)
    refs = [vocab.refs[n] for n in names]
    out = task.execute(tokenizer_info=vocab.info, tensors=dict(zip(refs, tensors)))
    return [out[r] for r in refs]


def shape(shapes: list[tuple], p: dict) -> tuple:
    from surgery.errors import SurgeryError

    rest = {tuple(s[1:]) for s in shapes}
    if len(rest) != 1:
        raise SurgeryError(f"shapes {[list(s) for s in shapes]} differ beyond the vocabulary axis")
    return (p["vocab"].rows, *shapes[0][1:])


def check_vocabulary(plan) -> None:
    """With a tokenizer, every vocabulary tensor must be re-indexed to it (set by a merge)."""
    if plan.recipe.tokenizer is None:
        return
    for e in plan.entries:
        if e.info.kind in VOCAB_KINDS and getattr(e.node, "params", {}).get("vocab") is None:
            raise plan.recipe.error(("tokenizer",), f"with a tokenizer, the vocabulary tensors must be set by a "
                                    f"merge, which re-indexes their rows; {e.name!r} is set by {e.rule}")


# ---------------------------------------------------------------------------- output files

def write_tokenizer(recipe, plan_inputs: dict, config_source: str, folder: Path, config: dict | None) -> dict | None:
    """Write the output tokenizer as mergekit does (``save_pretrained`` of the built tokenizer, or of the
    config source's tokenizer when only ``chat_template`` is set) and set config's vocabulary size."""
    if recipe.tokenizer is None and recipe.chat_template is None:
        return config
    from surgery.io.output import TOKENIZER_FILES

    if recipe.tokenizer is not None:
        vocab = recipe._vocabulary[1]
        tokenizer = vocab.info.tokenizer
    else:
        import transformers

        vocab = None
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(plan_inputs[config_source].root))
    for name in TOKENIZER_FILES:  # mergekit saves the tokenizer instead of copying the files
        (folder / name).unlink(missing_ok=True)
    if recipe.chat_template:
        _set_chat_template(tokenizer, recipe, plan_inputs)
    tokenizer.save_pretrained(str(folder))
    if vocab is not None and config is not None:
        _set_vocab_size(config, vocab.rows)
    return config


def _set_chat_template(tokenizer, recipe, plan_inputs) -> None:
    """mergekit.merge._set_chat_template: a built-in name, 'auto' (the template most inputs share), or Jinja."""
    from types import SimpleNamespace

    from mergekit.common import ModelPath, ModelReference
    from mergekit.merge import _set_chat_template as mergekit_set

    refs = [ModelReference(model=ModelPath(path=str(plan_inputs[n].root))) for n in recipe.inputs]
    mergekit_set(tokenizer, SimpleNamespace(chat_template=recipe.chat_template, referenced_models=lambda: refs))


def _set_vocab_size(config: dict, rows: int) -> None:
    """config's vocab size (mergekit's _update_config_vocab: the architecture's vocab_size key)."""
    key = _vocab_key(config.get("model_type"), tuple(config.get("architectures") or ()))
    target = config
    *parents, last = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = rows


@functools.lru_cache(maxsize=None)
def _vocab_key(model_type, architectures: tuple) -> str:
    import json
    from importlib import resources

    from mergekit._data import architectures as arch_data

    for f in resources.files(arch_data).iterdir():
        if f.name.endswith(".json"):
            data = json.loads(f.read_text())
            if data.get("model_type") == model_type and set(data.get("architectures", ())) & set(architectures):
                return data.get("vocab_size_config_key") or "vocab_size"
    return "vocab_size"
