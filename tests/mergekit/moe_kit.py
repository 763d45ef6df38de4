"""Tiny mixture-of-experts checkpoints for the MoE tests (test_moe.py, test_moe_recipes.py): Mixtral, Qwen2-MoE and
Qwen3-MoE saved one tensor per expert, as transformers saves them."""

from __future__ import annotations

import textwrap

import torch

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
# per-expert names of expert {e} in layer {l}: (gate, up, down)
PER_EXPERT = {"mixtral": "model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight",
              "qwen2_moe": "model.layers.{l}.mlp.experts.{e}.{w}.weight",
              "qwen3_moe": "model.layers.{l}.mlp.experts.{e}.{w}.weight"}
PROJ = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
        "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


def moe_config(arch: str):
    import transformers as tf

    if arch == "mixtral":
        return tf.MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=4,
                                architectures=["MixtralForCausalLM"])
    if arch == "qwen2_moe":  # mergekit has no architecture file for it and infers one from the fused names
        return tf.Qwen2MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                 shared_expert_intermediate_size=48, architectures=["Qwen2MoeForCausalLM"])
    if arch == "olmoe":  # no fused layout in _data/experts.json
        return tf.OlmoeConfig(**SMALL, intermediate_size=24, num_experts=4, architectures=["OlmoeForCausalLM"])
    return tf.Qwen3MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=24, head_dim=8, num_experts=4,
                             architectures=["Qwen3MoeForCausalLM"])


def saved_model(arch: str, folder):
    """A random model as ``save_pretrained`` writes it (experts one tensor each), and its in-memory state
    (transformers v5: experts fused)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(arch))
    model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors")), {k: v.detach().clone() for k, v in model.state_dict().items()}


def write(folder, name: str, text: str, **paths) -> str:
    path = folder / name
    path.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in paths.items()}))
    return str(path)


def errors(r) -> str:
    """stderr without the layout's warning for Qwen2-MoE (not in _data/layout.json's layer prefixes; mergekit
    has no architecture file for it either)."""
    return "".join(line for line in r.stderr.splitlines(keepends=True)
                   if not line.startswith("warning: ") or "is not in the layout tables" not in line)


def expert_names(arch: str, layer: int, expert: int) -> list[str]:
    return [PER_EXPERT[arch].format(l=layer, e=expert, w=w) for w in PROJ[arch]]


MK_CONFIGS = {
    "ties": """
        models:
          - model: {a}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.4, density: 0.7}}
        merge_method: ties
        base_model: {base}
        dtype: bfloat16
    """,
    "linear": """
        models:
          - model: {a}
            parameters: {{weight: 0.3}}
          - model: {b}
            parameters: {{weight: 0.7}}
        merge_method: linear
    """,
    "task_arithmetic": """
        models:
          - model: {a}
            parameters: {{weight: [0.2, 0.9]}}
          - model: {b}
            parameters: {{weight: 0.5}}
        merge_method: task_arithmetic
        base_model: {base}
        dtype: float32
        out_dtype: bfloat16
    """,
    # a filter on mergekit's names: Mixtral's router and experts are under 'mlp.' only once read fused
    "slerp_filter": """
        slices:
          - sources:
              - {{model: {a}, layer_range: [0, 2]}}
              - {{model: {b}, layer_range: [0, 2]}}
        merge_method: slerp
        base_model: {a}
        parameters:
          t: [{{filter: mlp, value: 0.3}}, {{value: 0.6}}]
        dtype: float32
    """,
    "passthrough_frankenmerge": """
        slices:
          - sources: [{{model: {a}, layer_range: [0, 2]}}]
          - sources: [{{model: {b}, layer_range: [1, 2]}}]
        merge_method: passthrough
        dtype: bfloat16
    """,
}
