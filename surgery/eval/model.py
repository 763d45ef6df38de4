"""Models to evaluate: a checkpoint directory, or a recipe's output built in memory.

    model, tokenizer = load_checkpoint_model("out/swap")
    model, tokenizer = recipe_model(load_recipe("recipe.yaml"))   # nothing written to disk

``recipe_model`` builds the model from the output config on the meta device and assigns the
plan's tensors one by one as ``surgery.core.execute.iter_tensors`` computes them, each cast to its
planned dtype exactly as the writer casts it: the weights are bitwise those `surgery run` writes,
and memory holds one model plus the tensors in flight.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import SurgeryError

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                     "spiece.model")


def torch_dtype_of(dtype: str | None):
    import torch

    if dtype in (None, "auto"):
        return None
    if dtype not in ("float32", "float16", "bfloat16"):
        raise SurgeryError(f"--dtype {dtype!r}: expected float32, float16 or bfloat16")
    return getattr(torch, dtype)


_TOKENIZERS: dict = {}  # (folder, files' mtimes) -> tokenizer: trials of a search share one load (~1 s each)


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in ``folder`` (loaded once per process while its files are unchanged);
    a clear error when it has none."""
    folder = Path(folder).resolve()
    present = [folder / name for name in TOKENIZER_MARKERS if (folder / name).is_file()]
    if not present:
        raise SurgeryError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_MARKERS[:2])}, ...); "
                           "pass --tokenizer DIR")
    key = (folder, tuple((p.name, p.stat().st_mtime_ns) for p in present))
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        try:
            _TOKENIZERS[key] = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SurgeryError(f"{folder}: transformers cannot load its tokenizer: {_first_line(e)}") from None
    return _TOKENIZERS[key]


def build_config(config: dict, where: str):
    """A transformers config object from a config.json dict; one-line error when it cannot be built."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise SurgeryError(f"{where}: transformers cannot build a model from this config: "
                           f"unknown model_type {model_type!r}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as e:  # transformers raises many kinds here (ValueError, hub validation errors, ...)
        raise SurgeryError(f"{where}: transformers cannot build a model from this config: {_first_line(e)}") from None


def empty_model(config, where: str, dtype=None):
    """A causal LM with its parameters on the meta device (buffers real, as ``__init__`` computes them)."""
    from accelerate import init_empty_weights  # accelerate comes with mergekit (and peft, lm-eval)
    from transformers import AutoModelForCausalLM

    try:  # no random init of weights that are replaced anyway (10x faster for a 135M model)
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    try:
        with init_empty_weights(include_buffers=False), no_init_weights():
            return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    except Exception as e:  # e.g. an architecture with no causal LM class, or inconsistent sizes
        raise SurgeryError(f"{where}: transformers cannot build a causal LM from this config: "
                           f"{_first_line(e)}") from None


def load_checkpoint_model(path: str | Path, *, device: str = "cpu", dtype: str | None = None,
                          tokenizer: str | Path | None = None):
    """(model, tokenizer) for a checkpoint directory, in eval mode on ``device``."""
    path = Path(path)
    if not path.is_dir():
        raise SurgeryError(f"{path}: not a checkpoint directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SurgeryError(f"{path}: no config.json")
    config = build_config(_read_config(config_path), str(config_path))
    tok = load_tokenizer(tokenizer or path)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype_of(dtype) or "auto")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SurgeryError(f"{path}: transformers cannot load this checkpoint: {_first_line(e)}") from None
    return model.to(device).eval(), tok


def recipe_model(recipe, *, device: str = "cpu", dtype: str | None = None, tokenizer: str | Path | None = None,
                 plan=None):
    """(model, tokenizer) of a recipe's output, built in memory without writing anything.

    ``recipe``: a ``Recipe`` (or a path/dict for ``load_recipe``). ``plan``: reuse an already built plan."""
    import torch

    from surgery.core.execute import iter_tensors
    from surgery.io.safetensors import torch_dtype
    from surgery.pipeline import build_plan, patch_config
    from surgery.loader import load_recipe
    from surgery.recipe.schema import Recipe

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    plan = build_plan(recipe) if plan is None else plan
    try:
        source = plan.inputs[plan.config_source].root
        config_path = source / "config.json"
        if not config_path.is_file():
            raise SurgeryError(f"{source}: no config.json (the recipe's output config comes from it)")
        config = build_config(patch_config(_read_config(config_path), plan), str(config_path))
        tok = load_tokenizer(tokenizer or plan.inputs[recipe.output.tokenizer_from or plan.config_source].root)
        cast = torch_dtype_of(dtype)
        model = empty_model(config, str(config_path), cast)
        slots = _slots(model)
        for entry, tensor in iter_tensors(plan):
            if entry.name not in slots:
                raise SurgeryError(f"tensor {entry.name!r}: no such parameter in {type(model).__name__} "
                                   f"built from {config_path}")
            t = tensor.detach().to("cpu").contiguous()
            if t.dtype != torch_dtype(entry.dtype):  # the writer's cast, so the bits are the written ones
                t = t.to(torch_dtype(entry.dtype))
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            module, attr, is_param = slots[entry.name]
            t = t.to(device)
            if is_param:
                module._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
            else:
                module._buffers[attr] = t
            del tensor, t
    finally:
        for ck in plan.inputs.values():
            ck.close()
    if any(p.device.type == "meta" for p in model.parameters()):
        model.tie_weights()  # e.g. a tied lm_head the checkpoint stores once
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SurgeryError(f"{config_path}: the recipe's output has no tensor {missing[0]!r}, which "
                           f"{type(model).__name__} needs" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return model.to(device).eval(), tok


def _slots(model) -> dict:
    """name -> (module, attribute, is_parameter) for every parameter and buffer, tied ones included."""
    slots = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for attr in module._parameters:
            slots[prefix + attr] = (module, attr, True)
        for attr in module._buffers:
            slots[prefix + attr] = (module, attr, False)
    return slots


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SurgeryError(f"{path}: expected a JSON object")
    return data


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
