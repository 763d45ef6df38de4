"""One loader of models, for everything that runs them: eval, probe, search and the demo's check.

    model, tokenizer = load_model("out/swap")            # a checkpoint folder: transformers' from_pretrained
    model, tokenizer = load_model("org/name@main")       # a Hub id, fetched as a recipe's inputs are
    model, tokenizer = load_model("recipe.yaml")         # the recipe's output, built in memory: nothing written
    model, tokenizer = load_model(plan)                  # a Plan, a Recipe, a recipe dict, an open Checkpoint

References are resolved by ``surgery.io.reference``, with the messages every command gives. A recipe's output
(and a lone .safetensors file) is built from its config on the meta device, then its tensors are assigned one
by one as they are read or computed (``iter_tensors``), each cast to its planned dtype exactly as the writer
casts it: the weights are bitwise those `surgery run` writes, and memory holds one model plus the tensors in
flight. Progress bars (transformers' weight loading, Hub downloads) follow ``surgery.io.progress``.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.reference import MODEL, resolve_reference

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                     "spiece.model")
TOKENIZER_PATTERNS = ["tokenizer*", "*.model", "vocab.*", "merges.txt", "special_tokens_map.json", "*.jinja",
                      "*.tiktoken", "config.json"]
DTYPES = ("float32", "float16", "bfloat16")


def load_model(ref, *, device: str = "cpu", dtype: str | None = None, tokenizer=None, progress: bool | None = None,
               encoder: bool = False, base_dir: Path | None = None):
    """(model, tokenizer), the model in eval mode on ``device``, for a model reference (a checkpoint folder or
    .safetensors file, a Hub id, a recipe file) or an object (``Plan``, ``Recipe``, recipe dict, ``Checkpoint``,
    ``PlanReader``).

    ``dtype``: float32, float16 or bfloat16, the weights cast after they are read or computed exactly (None or
    'auto': as stored or planned). ``tokenizer``: a folder, a Hub id or a tokenizer object instead of the model's
    own. ``progress``: library bars on or off (None: the rule of ``surgery.io.progress``). ``encoder``: accept
    a model without a causal-LM class (its base model, e.g. a sentence encoder)."""
    from surgery.io.progress import library_bars

    torch_dtype_of(dtype)  # a bad dtype is refused before any work
    with library_bars(progress):  # downloads and transformers' loading bars
        return _load(ref, device, dtype, tokenizer, encoder, base_dir)


def _load(ref, device, dtype, tokenizer, encoder, base_dir):
    from surgery.core.execute import PlanReader
    from surgery.core.plan import Plan
    from surgery.io.checkpoint import Checkpoint
    from surgery.recipe.schema import Recipe

    if isinstance(ref, (str, Path)):
        found = resolve_reference(ref, base_dir=base_dir, kinds=MODEL)
        if found.kind == "recipe":
            return _from_plan(_plan(found.path), device, dtype, tokenizer, encoder)
        ref = Checkpoint.open(found.text, base_dir=base_dir)
    if isinstance(ref, PlanReader):
        ref = ref.plan
    if isinstance(ref, (Recipe, dict)):
        ref = _plan(ref)
    if isinstance(ref, Plan):
        return _from_plan(ref, device, dtype, tokenizer, encoder)
    if isinstance(ref, Checkpoint):
        return _from_checkpoint(ref, device, dtype, tokenizer, encoder)
    raise SurgeryError(f"cannot load a model from a {type(ref).__name__}: give a checkpoint, a Hub id, a recipe "
                       "or a plan")


def model_kind(ref, base_dir: Path | None = None) -> str:
    """'recipe' (its output is built in memory) or 'checkpoint' (read as it is); a bad reference is refused."""
    from surgery.core.plan import Plan
    from surgery.recipe.schema import Recipe

    if isinstance(ref, (Recipe, Plan, dict)):
        return "recipe"
    if isinstance(ref, (str, Path)):
        return "recipe" if resolve_reference(ref, base_dir=base_dir).kind == "recipe" else "checkpoint"
    return "checkpoint"


def torch_dtype_of(dtype: str | None):
    if dtype in (None, "auto"):
        return None
    if dtype not in DTYPES:
        raise SurgeryError(f"--dtype {dtype!r}: expected float32, float16 or bfloat16")
    import torch

    return getattr(torch, dtype)


_TOKENIZERS: dict = {}  # (folder, files' mtimes) -> tokenizer: trials of a search share one load (~1 s each)


def load_tokenizer(source):
    """The tokenizer of ``source``: a folder, a Hub id (its tokenizer files fetched) or a tokenizer object (used
    as it is); loaded once per process while its files are unchanged; a clear error when there is none."""
    if not isinstance(source, (str, Path)):
        return source
    found = resolve_reference(source, kinds=("checkpoint", "hub"))
    if found.kind == "hub":
        from surgery.io.hub_fetch import fetch_snapshot

        folder = fetch_snapshot(found.text, TOKENIZER_PATTERNS).resolve()
    else:
        folder = found.path.resolve() if found.path.is_dir() else found.path.resolve().parent
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


def empty_model(config, where: str, dtype=None, encoder: bool = False):
    """A causal LM (or, with ``encoder``, the base model where there is none) with its parameters on the meta
    device (buffers real, as ``__init__`` computes them)."""
    from accelerate import init_empty_weights  # accelerate comes with mergekit (and peft, lm-eval)
    from transformers import AutoModel, AutoModelForCausalLM

    try:  # no random init of weights that are replaced anyway (10x faster for a 135M model)
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        with init_empty_weights(include_buffers=False), no_init_weights():
            try:
                return AutoModelForCausalLM.from_config(config, **kwargs)
            except ValueError:  # no causal-LM class for this config (encoders)
                if not encoder:
                    raise
                return AutoModel.from_config(config, **kwargs)
    except Exception as e:  # e.g. an architecture with no causal LM class, or inconsistent sizes
        raise SurgeryError(f"{where}: transformers cannot build a causal LM from this config: "
                           f"{_first_line(e)}") from None


def _plan(recipe):
    from surgery.pipeline import build_plan

    return build_plan(recipe)


def _from_checkpoint(ck, device, dtype, tokenizer, encoder):
    """A folder through transformers' from_pretrained (its key conventions, tied and ignored weights); a lone
    weights file (which may not be all the folder holds) streamed into the model its folder's config builds."""
    if ck.source is not None and ck.source.is_file():
        config_path = ck.root / "config.json"
        tensors = ((name, ck.get(name)) for name in ck.keys())
        try:
            model = _fill(build_config(_config(config_path), str(config_path)), tensors, config_path, dtype, device,
                          encoder)
        finally:
            ck.close()
        return _placed(model, device), load_tokenizer(tokenizer or ck.root)
    ck.close()
    config_path = ck.root / "config.json"
    config = build_config(_config(config_path), str(config_path))
    tok = load_tokenizer(tokenizer or ck.root)
    from transformers import AutoModel, AutoModelForCausalLM

    cast = torch_dtype_of(dtype) or "auto"
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(ck.root, config=config, dtype=cast)
        except ValueError:  # no causal-LM class (encoders)
            if not encoder:
                raise
            model = AutoModel.from_pretrained(ck.root, config=config, dtype=cast)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SurgeryError(f"{ck.ref}: transformers cannot load this checkpoint: {_first_line(e)}") from None
    return _placed(model, device), tok


def _from_plan(plan, device, dtype, tokenizer, encoder):
    from surgery.core.execute import iter_tensors
    from surgery.io.safetensors import torch_dtype

    try:
        source = plan.inputs[plan.config_source].root
        config_path = source / "config.json"
        config = build_config(_config(config_path, plan, f"{source}: no config.json (the recipe's output config "
                                                      "comes from it)"), str(config_path))
        tok = load_tokenizer(tokenizer or plan.inputs[plan.recipe.output.tokenizer_from or plan.config_source].root)
        tensors = ((e.name, t if t.dtype == torch_dtype(e.dtype) else t.to(torch_dtype(e.dtype)))  # the writer's cast
                   for e, t in iter_tensors(plan))
        model = _fill(config, tensors, config_path, dtype, device, encoder, "the recipe's output")
    finally:
        for ck in plan.inputs.values():
            ck.close()
    return _placed(model, device), tok


def _config(path: Path, plan=None, missing: str | None = None) -> dict:
    """config.json as a dict (patched to the plan's output, given one)."""
    if not path.is_file():
        raise SurgeryError(missing or f"{path.parent}: no config.json")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SurgeryError(f"{path}: expected a JSON object")
    if plan is not None:
        from surgery.pipeline import patch_config

        data = patch_config(data, plan)
    return data


def _fill(config, tensors, config_path: Path, dtype, device, encoder, what: str = "the checkpoint"):
    """The model ``config`` builds, each of its parameters and buffers assigned from ``tensors`` (name, tensor)."""
    import torch

    cast = torch_dtype_of(dtype)
    model = empty_model(config, str(config_path), cast, encoder)
    slots = _slots(model)
    for name, tensor in tensors:
        if name not in slots:
            raise SurgeryError(f"tensor {name!r}: no such parameter in {type(model).__name__} "
                               f"built from {config_path}")
        t = tensor.detach().to("cpu").contiguous()
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        module, attr, is_param = slots[name]
        t = t.to(device)
        if is_param:
            module._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[attr] = t
        del tensor, t
    if any(p.device.type == "meta" for p in model.parameters()):
        model.tie_weights()  # e.g. a tied lm_head the checkpoint stores once
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SurgeryError(f"{config_path}: {what} has no tensor {missing[0]!r}, which "
                           f"{type(model).__name__} needs" + more)
    return model


def _placed(model, device: str):
    try:
        return model.to(device).eval()
    except (RuntimeError, AssertionError) as e:  # e.g. cuda asked for where torch has none
        raise SurgeryError(f"--device {device}: {_first_line(e)}") from None


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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
