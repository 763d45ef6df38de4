"""The adapters every adapter test reads: a tiny llama and gpt2 base with LoRA and (IA)³ adapters made by peft."""

from __future__ import annotations

import pytest
from adapter_kit import make_adapter
from helpers import random_state, save_checkpoint, tiny_config


@pytest.fixture(scope="session")
def ad(tmp_path_factory):
    """A tiny fp32 llama base and gpt2 base, with LoRA and (IA)³ adapters made by peft (random init)."""
    from peft import IA3Config, LoraConfig

    root = tmp_path_factory.mktemp("adapters")
    cfg = tiny_config("llama")
    base = save_checkpoint(root / "base", random_state(cfg, 0), cfg)
    p = {"root": root, "base": base}

    def lora(**kw):
        return LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw)

    p["lora_full"] = make_adapter(base, root / "lora_full", lora(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3}), 1)
    p["lora_rs"] = make_adapter(base, root / "lora_rs", lora(r=8, lora_alpha=4, use_rslora=True,
                                                             target_modules=["k_proj", "o_proj", "up_proj"]), 2)
    for i, name in enumerate(["task", "tgt", "src"]):
        p[f"lora_{name}"] = make_adapter(base, root / f"lora_{name}", lora(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]), 10 + i)
    p["lora_lang2"] = make_adapter(base, root / "lora_lang2",
                                   lora(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"]), 20)
    for i, name in enumerate(["task", "tgt", "src"]):
        p[f"ia3_{name}"] = make_adapter(base, root / f"ia3_{name}", IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
            init_ia3_weights=False), 30 + i)
    # GPT-2: Conv1D weights (fan_in_fan_out) and biases
    g = tiny_config("gpt2")
    p["gbase"] = save_checkpoint(root / "gbase", random_state(g, 0), g)
    p["g_lora"] = make_adapter(p["gbase"], root / "g_lora", lora(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                 fan_in_fan_out=True), 40)
    p["g_bias"] = make_adapter(p["gbase"], root / "g_bias", lora(r=2, lora_alpha=4, target_modules=["c_proj"],
                                                                 fan_in_fan_out=True, bias="all", lora_bias=True), 42)
    p["g_ia3"] = make_adapter(p["gbase"], root / "g_ia3", IA3Config(target_modules=["c_attn", "c_fc"],
                              feedforward_modules=["c_fc"], fan_in_fan_out=True, init_ia3_weights=False), 41)
    return p
