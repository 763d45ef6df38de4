"""Helpers of the adapter tests: peft's own adapters and merges as the reference, and the raw adapter tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from helpers import load
from safetensors.torch import load_file, save_file

Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN3 = "model.layers.3.mlp.down_proj.weight"


def _model(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def make_adapter(base, out, config, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    get_peft_model(_model(base), config).save_pretrained(out)
    return out


def peft_merged(base, *adapters) -> dict:
    """PEFT's own merge_and_unload() of one or more adapters, applied in order."""
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(_model(base), adapters[0], adapter_name=names[0])
    for n, p in zip(names[1:], adapters[1:]):
        pm.load_adapter(p, adapter_name=n)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload(adapter_names=names).state_dict().items()}



def run_recipe(recipe: dict, out):
    from surgery.pipeline import run

    run(recipe, out, force=True)
    return load(out)


def raw(adapter) -> dict:
    return load_file(str(Path(adapter) / "adapter_model.safetensors"))



def _copy(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        c = json.loads((dst / "adapter_config.json").read_text())
        c.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(c))
    if tensors:
        save_file(tensors(raw(dst)), str(dst / "adapter_model.safetensors"))
    return dst


def _adamergex_inputs(ad, kind):
    return {"base": str(ad["base"]), **{n: {"adapter": str(ad[f"{kind}_{n}"]), "base": "base"}
                                        for n in ("task", "tgt", "src")}}


def _ops(t, mode="delta"):
    return [{"adamergex": {"task": "task", "target_ref": "tgt", "source_ref": "src", "t": t, "mode": mode}}]
