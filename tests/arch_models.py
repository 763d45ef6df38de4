"""Tiny random checkpoints of every architecture the matrix tests (tests/test_arch_matrix.py).

    cfg = arch_config("gpt_bigcode")                  # a transformers config: 2 layers, hidden 32, vocab 259
    paths = arch_family("gpt_bigcode", tmp_path)       # {"base", "a", "b"}: a base and two fine-tunes

Each checkpoint is saved with the byte-level tokenizer (vocab 259, tokens 256-258 special), so eval runs on it.
The fine-tunes differ from the base by small noise everywhere, larger in layer 1 ("a") or layer 0 ("b"), so a
diff ranks the layers in a known order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import save_checkpoint

VOCAB = 259  # the byte tokenizer's: 256 bytes + <s>, </s>, <pad>
LAYERS = 2
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=256, eos_token_id=257, pad_token_id=258)
GQA = dict(num_key_value_heads=2)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# model_type -> (architecture class, config keyword arguments beyond COMMON); embeddings are tied where the
# architecture's config ties them by default (gemma*, gpt2, ...).
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM", GQA),
    "mistral": ("MistralForCausalLM", GQA),
    "qwen2": ("Qwen2ForCausalLM", GQA),
    "qwen3": ("Qwen3ForCausalLM", dict(GQA, head_dim=8)),
    "gemma": ("GemmaForCausalLM", dict(GQA, head_dim=8)),
    "gemma2": ("Gemma2ForCausalLM", dict(GQA, head_dim=8, sliding_window=16)),
    "gemma3_text": ("Gemma3ForCausalLM", dict(GQA, head_dim=8, sliding_window=16)),
    "phi": ("PhiForCausalLM", dict()),
    "phi3": ("Phi3ForCausalLM", dict(GQA)),
    "cohere": ("CohereForCausalLM", dict(GQA, use_qk_norm=True)),  # mergekit's cohere.json requires q/k norms
    "granite": ("GraniteForCausalLM", dict(GQA)),
    "glm4": ("Glm4ForCausalLM", dict(GQA, head_dim=8)),
    "olmo2": ("Olmo2ForCausalLM", dict(GQA)),
    "mixtral": ("MixtralForCausalLM", dict(GQA, **MOE)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(GQA, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=16, decoder_sparse_step=1)),
    "stablelm": ("StableLmForCausalLM", dict(GQA)),
    "starcoder2": ("Starcoder2ForCausalLM", dict(GQA)),
    "gpt_neox": ("GPTNeoXForCausalLM", dict()),
    "falcon": ("FalconForCausalLM", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "gpt2": ("GPT2LMHeadModel", dict(n_inner=64)),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", dict(n_inner=64, multi_query=True)),
    "exaone4": ("Exaone4ForCausalLM", dict(GQA, head_dim=8, sliding_window=16)),
    "apertus": ("ApertusForCausalLM", dict(GQA)),
    "arcee": ("ArceeForCausalLM", dict(GQA)),
    "cohere2": ("Cohere2ForCausalLM", dict(GQA, sliding_window=16)),
    "glm4_moe": ("Glm4MoeForCausalLM", dict(GQA, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,  # layer 0 dense
                                              moe_intermediate_size=16, first_k_dense_replace=1, n_shared_experts=1)),
}


# architectures mergekit 0.1.5 has no definition for, built for single tests outside the matrix
OTHERS: dict[str, tuple[str, dict]] = {
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                shared_expert_intermediate_size=48, decoder_sparse_step=1)),
}


def arch_config(model_type: str):
    """A tiny transformers config of ``model_type``, naming its causal-LM class in ``architectures``."""
    from transformers import AutoConfig

    cls, extra = {**ARCHS, **OTHERS}[model_type]
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **extra})
    cfg.architectures = [cls]
    return cfg


def arch_state(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the names, shapes and tying ``save_pretrained`` writes (MoE experts one by one, as the
    Hub's Mixtral and Qwen3-MoE checkpoints store them, not fused as the loaded model holds them)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from helpers import load

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with tempfile.TemporaryDirectory(prefix="arch-") as folder:
        model.save_pretrained(folder)
        return load(folder)


def fine_tune(state: dict, loud_layer: int, seed: int) -> dict:
    """Noise of 0.01 everywhere, 0.1 in tensors of ``loud_layer``."""
    import re

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        m = re.search(r"\.(\d+)\.", k)
        scale = 0.1 if m and int(m[1]) == loud_layer else 0.01
        out[k] = v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
    return out


def arch_family(model_type: str, root: Path) -> dict[str, Path]:
    """base, a (changed most in layer 1), b (changed most in layer 0), saved in bfloat16 with a tokenizer."""
    from surgery.demo import save_byte_tokenizer

    cfg = arch_config(model_type)
    base = arch_state(cfg)
    cfg.dtype = torch.bfloat16  # as save_pretrained writes a bfloat16 model's config
    states = {"base": base, "a": fine_tune(base, 1, seed=1), "b": fine_tune(base, 0, seed=2)}
    paths = {}
    for name, state in states.items():
        paths[name] = save_checkpoint(root / name, state, cfg, dtype=torch.bfloat16)
        save_byte_tokenizer(paths[name])
    return paths
