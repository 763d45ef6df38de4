"""The recipe schema: pydantic models for everything in a recipe but the operations themselves.

    recipe.inputs["math"]          # 'path/or/hub-id'
    recipe.operations[0]           # LayerSwap(donor='sw', bottom=2, ...)

A recipe names its inputs, picks a recipient (the default source of every tensor and of the
config), and lists operations. Operations apply in order; when two select the same tensor,
the later one wins. Each operation is a subclass of ``Operation`` (surgery.operations); the
loader (surgery.loader) validates each against the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from surgery.errors import RecipeError
from surgery.recipe.locations import where
from surgery.recipe.parsing import LayerSpec, parse_size

DTYPES = ("float32", "float16", "bfloat16")
Source = Union[Literal["recipient", "donor"], float]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


class AdapterInput(Strict):
    """A PEFT adapter directory (LoRA or (IA)³) applied to a base: reads like the merged checkpoint."""

    adapter: str = Field(description="Directory with adapter_config.json and adapter_model.safetensors.")
    base: str = Field(description="The base it applies to: an input name, or a path / Hub id.")


class Operation(Strict):
    """Base of every operation: its recipe schema (pydantic fields), its name in recipes (``op_name``)
    and its planner (``plan``), in one class. ``input_refs`` names the inputs it uses, by field."""

    op_name: ClassVar[str] = ""

    def input_refs(self) -> dict[str, list[str]]:
        return {}

    def plan(self, ctx) -> None:
        """Give the tensors this operation selects their op trees (``ctx`` is a core.plan.Context)."""
        raise NotImplementedError(f"{type(self).__name__} has no planner")


class Select(Strict):
    """Which tensors an operation applies to. All given criteria must hold; none given = all."""

    layers: LayerSpec | None = Field(None, description="Layer indices: 3, '0-3, 28-31', [0, -1]. Negative counts from the end. Tensors outside layers (embeddings, final norm, lm_head) are never selected by this.")
    modules: list[str] | None = Field(None, description="Module kinds (attn_q, mlp_down, ...) or groups (attn, mlp, norm, embed, lm_head, other).")
    names: list[str] | None = Field(None, description="Tensor-name globs ('*.mlp.*') or regexes prefixed 're:'.")
    exclude: list[str] | None = Field(None, description="Tensor-name globs or 're:' regexes to leave out.")
    experts: list[int] | None = Field(None, description="Mixture-of-experts models: expert indices ([0, 3]; negative counts from the end). Selects those experts' tensors (per-expert tensors, or their slices of a fused tensor), nothing else: not attention, norms or the router.")
    missing: Literal["error", "skip"] = Field("error", description="A module kind or name the model lacks (a tied lm_head): 'error' (a selection that changes nothing is a mistake), or 'skip' it, as mergekit skips an optional tensor; translated mergekit configs use 'skip'.")

    @field_validator("names", "exclude")
    @classmethod
    def _regexes(cls, v):
        import re

        for pattern in v or []:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ValueError(f"invalid regex {pattern[3:]!r}: {e}") from None
        return v


class Output(Strict):
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="Output dtype of floating tensors. Default: each tensor keeps the recipient's dtype.")
    shard_size: Union[int, str] = Field("5GB", description="Maximum shard size: bytes, or with a KB/MB/GB suffix.")
    config_from: str | None = Field(None, description="Input whose config.json, generation_config.json and tokenizer files are copied. Default: the recipient.")
    tokenizer_from: str | None = Field(None, description="Input whose tokenizer files are copied instead of config_from's.")
    config_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="dtype written to config.json when it differs from the tensors' (mergekit's `dtype` without `out_dtype`). Default: `dtype`.")

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v):
        parse_size(v)
        return v

    @property
    def shard_bytes(self) -> int:
        """``shard_size`` in bytes (validated with the recipe)."""
        return parse_size(self.shard_size)


class TokenSource(Strict):
    """Where a token's embedding row comes from (mergekit's ``tokens:`` entries)."""

    kind: Literal["zero", "model_token"] = Field(description="'zero': a zero row; 'model_token': a row of `model`.")
    model: str | None = Field(None, description="Input giving the row (model_token).")
    token_id: int | None = Field(None, description="Row index in that input's vocabulary.")
    token: str | None = Field(None, description="Or the token whose row it is.")


class TokenEmbedding(Strict):
    source: Union[str, TokenSource, None] = Field(None, description="An input name (its row for the token), or {kind: zero} / {kind: model_token, model, token | token_id}.")
    force: bool = Field(False, description="Use `source` even where the input has the token.")


class Tokenizer(Strict):
    """The output vocabulary (mergekit's ``tokenizer:`` section): embedding and lm_head rows are re-indexed to it."""

    source: str = Field("union", description="'union' (every input's tokens), 'base' (the base's, without tokens past its vocab_size), or an input name.")
    base: str | None = Field(None, description="The base input: first in the union, and the default row source. Default: the recipient.")
    tokens: dict[str, TokenEmbedding] | None = Field(None, description="Tokens to add or whose rows to choose: token -> {source, force}.")
    pad_to_multiple_of: int | None = Field(None, gt=0, description="Pad the vocabulary rows to a multiple of this (padding rows are the mean row).")


class StackSegment(Strict):
    """Output layers built from a range of source layers (changes the layer count).

    ``from`` picks the input whose layers these are (default: the recipient), so a stack can
    build a frankenmerge from several models. ``sources`` gives, for other inputs, the layers
    that line up with these output layers when an operation reads them (e.g. a slerp of
    a's layers 0-3 with b's layers 4-7); inputs not listed use the same indices as ``layers``.
    """

    layers: LayerSpec = Field(description="Source layer indices, in order: '0-15'.")
    from_: str | None = Field(None, alias="from", description="Input these layers come from. Default: the recipient.")
    sources: dict[str, LayerSpec] | None = Field(None, description="Other inputs' source layers for the same output layers: {b: '4-7'}.")
    model_config = ConfigDict(extra="forbid", populate_by_name=True, defer_build=True)


class Recipe(Strict):
    description: str | None = Field(None, description="Free text, copied to the manifest.")
    inputs: dict[str, Union[str, AdapterInput]] = Field(description="Name -> local directory, .safetensors file, or Hub id 'org/name[@revision]'; or {adapter: dir, base: input} for a PEFT adapter.")
    recipient: str | None = Field(None, description="Input that gives every tensor no operation selects, and the config. Default: the first input.")
    output: Output = Field(default_factory=Output)
    stack: list[StackSegment] | None = Field(None, description="Output layer order as source-layer ranges; default: the recipient's layers.")
    operations: list[Any] = Field(default_factory=list, description="Operations, applied in order; later ones win.")
    seed: int | None = Field(None, description="Seed for random methods.")
    experts: Literal["stored", "fused"] | None = Field(None, description="Mixture-of-experts weights: 'stored' (the default) plans them as the checkpoint stores them (one tensor per expert for transformers-saved Mixtral and Qwen3-MoE; a merge merges each expert's tensor alone); 'fused' reads them as mergekit does (all experts of a layer stacked in one tensor, merged at once, written under the fused names). mergekit configs run 'fused'.")
    tokenizer: Tokenizer | None = Field(None, description="Build the output tokenizer and re-index vocabulary rows (see docs/mergekit.md).")
    chat_template: str | None = Field(None, description="Chat template written into the output tokenizer: alpaca, chatml, exaone, llama3, mistral, 'auto' or a Jinja template.")

    # filled by load_recipe, not part of the schema
    _source: str | None = None
    _lines: dict = {}
    _text: str | None = None
    _base_dir: Path | None = None
    _path_map: dict = {}  # recipe path prefix -> path in the source file (translated mergekit configs)
    _vocabulary: Any = None  # (inputs key, surgery.operations.vocab.Vocabulary) once planned with a tokenizer

    @property
    def base_dir(self) -> Path | None:
        """The folder relative input paths are resolved against (the recipe file's)."""
        return self._base_dir

    @property
    def source(self) -> str | None:
        """The recipe's file name (or '<recipe>' for text), for messages."""
        return self._source

    @property
    def recipient_name(self) -> str:
        return self.recipient or next(iter(self.inputs))

    def where(self, path: tuple) -> str:
        path = tuple(path)
        for n in range(len(path), 0, -1):
            if path[:n] in self._path_map:
                path = self._path_map[path[:n]] + path[n:]
                break
        return where(self._source, self._lines, path)

    def error(self, path: tuple, message: str) -> RecipeError:
        return RecipeError(message, self.where(path), path)

    def to_yaml(self) -> str:
        if self._text is not None:
            return self._text
        data = self.model_dump(by_alias=True, exclude_none=True, exclude={"operations"})
        data["operations"] = [{op.op_name: op.model_dump(by_alias=True, exclude_none=True)}
                              for op in self.operations]
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
