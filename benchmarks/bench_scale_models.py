"""Real-shape bf16 checkpoints for bench_scale.py, written tensor by tensor without a model or torch.

Two shapes, with the tensor names, config.json, shard names and model.safetensors.index.json that
transformers' save_pretrained writes (shards of at most 5 GB, tensors in state_dict order):

  8b    Llama-3.1-8B: hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336, vocab 128256,
        untied lm_head (16.06 GB at full depth)
  moe   Qwen3-30B-A3B: hidden 2048, 48 layers, 32 heads / 4 KV heads (head_dim 128, q/k norms), 128 experts of
        intermediate 768 stored one tensor per expert and projection (mlp.experts.E.gate_proj.weight, as the
        Hub checkpoints are), router mlp.gate, vocab 151936, untied lm_head (61 GB at full depth)

Values are bf16 bit patterns cut from pools made once with numpy: weights N(0, 0.02), norms 1 + N(0, 0.1).
A fine-tune is its base plus a small random number of ulps per entry (-1..1, a relative change of ~0.5%),
larger (-6..6) in some layers: the top quarter for "a", the bottom quarter for "b", so that the two
fine-tunes changed different layers as a language expert and a task expert do. The three models are
written side by side, one chunk of at most 32M entries in memory at a time, so generation runs at the
disk's write speed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size "5GB"
CHUNK = 1 << 25  # entries per chunk (64 MB of bf16)
POOL = 1 << 25


SMOKE = {"8b": {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8, "num_key_value_heads": 2,
                "head_dim": 32, "vocab_size": 8016},
         "moe": {"hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 96, "num_experts": 16,
                 "num_experts_per_tok": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
                 "vocab_size": 9496}}


def config(shape: str, layers: int | None, smoke: bool = False) -> dict:
    """The shape's config.json; smoke: the same names and layout at 1/16 of the width (checks the script)."""
    if shape == "8b":
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
               "num_hidden_layers": 32, "vocab_size": 128256, "hidden_act": "silu", "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False,
               "torch_dtype": "bfloat16", "initializer_range": 0.02, "use_cache": True}
    elif shape == "moe":
        cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
               "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
               "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
               "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48,
               "vocab_size": 151936, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
               "rope_theta": 1000000.0, "attention_bias": False, "router_aux_loss_coef": 0.001,
               "output_router_logits": False, "bos_token_id": 151643, "eos_token_id": 151645,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "initializer_range": 0.02,
               "use_cache": True, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 48}
    else:
        raise SystemExit(f"--shape: unknown shape {shape!r} (8b, moe)")
    if smoke:
        cfg.update(SMOKE[shape])
    if layers is not None:
        cfg["num_hidden_layers"] = cfg["max_window_layers"] = layers
        if shape == "8b":
            del cfg["max_window_layers"]
    return cfg


def tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in state_dict order, as transformers names them on disk."""
    h, v, d = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q))]
        if cfg["model_type"] == "qwen3_moe":
            i = cfg["moe_intermediate_size"]
            out += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,)),
                    (p + "mlp.gate.weight", (cfg["num_experts"], h))]
            for e in range(cfg["num_experts"]):
                out += [(p + f"mlp.experts.{e}.gate_proj.weight", (i, h)),
                        (p + f"mlp.experts.{e}.up_proj.weight", (i, h)),
                        (p + f"mlp.experts.{e}.down_proj.weight", (h, i))]
        else:
            i = cfg["intermediate_size"]
            out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def model_bytes(cfg: dict) -> int:
    return sum(2 * int(np.prod(s)) for _, s in tensors(cfg))


def shards(specs: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split like transformers: a new shard when the next tensor would pass SHARD_BYTES."""
    out, size = [[]], 0
    for name, shape in specs:
        n = 2 * int(np.prod(shape))
        if out[-1] and size + n > SHARD_BYTES:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += n
    return out


def header(group: list[tuple[str, tuple[int, ...]]]) -> bytes:
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in group:
        n = 2 * int(np.prod(shape))
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class Pools:
    """bf16 bit patterns of N(0, 0.02) and 1 + N(0, 0.1), and ulp offsets, cut at random places."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        normal = self.rng.standard_normal(POOL, dtype=np.float32)
        self.weight = self._bf16(normal * np.float32(0.02))
        tiny = (self.weight & 0x7F80) == 0  # zeros and subnormals (a few): a ulp step down from +0 would be NaN
        self.weight[tiny] = (self.weight[tiny] & 0x8000) | 0x3C00  # +-2^-7
        self.norm = self._bf16(1 + normal[: 1 << 20] * np.float32(0.1))
        self.small = self.rng.integers(-1, 2, POOL, dtype=np.int16).view(np.uint16)
        self.large = self.rng.integers(-6, 7, POOL, dtype=np.int16).view(np.uint16)

    @staticmethod
    def _bf16(x: np.ndarray) -> np.ndarray:  # round to nearest even
        u = x.view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    def cut(self, pool: np.ndarray, n: int) -> np.ndarray:
        start = int(self.rng.integers(0, len(pool)))
        if start + n <= len(pool):
            return pool[start:start + n]
        return np.concatenate([pool[start:], pool[: n - (len(pool) - start)]])


def generate(folder: Path, cfg: dict, log=print) -> dict[str, Path]:
    """base, a and b of the config under folder (skipped when already complete); returns their paths."""
    paths = {n: folder / n for n in ("base", "a", "b")}
    if all((p / "done").exists() for p in paths.values()):
        return paths
    specs = tensors(cfg)
    groups = shards(specs)
    names = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    total = sum(2 * int(np.prod(s)) for _, s in specs)
    index = {"metadata": {"total_size": total},
             "weight_map": {n: names[k] for k, g in enumerate(groups) for n, _ in g}}
    L = cfg["num_hidden_layers"]
    louder = {"base": set(), "a": set(range(L - max(1, L // 4), L)), "b": set(range(max(1, L // 4)))}
    pools = Pools()
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(cfg, indent=2))
        (p / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for k, group in enumerate(groups):
        files = {n: open(p / names[k], "wb") for n, p in paths.items()}
        try:
            for f in files.values():
                f.write(header(group))
            for name, shape in group:
                n = int(np.prod(shape))
                layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
                pool = pools.norm if len(shape) == 1 else pools.weight
                for start in range(0, n, CHUNK):
                    m = min(CHUNK, n - start)
                    base = pools.cut(pool, m)
                    for model, f in files.items():
                        if model == "base":
                            f.write(base.data)
                        else:
                            f.write((base + pools.cut(pools.large if layer in louder[model] else pools.small, m)).data)
        finally:
            for f in files.values():
                f.close()
        log(f"  wrote shard {k + 1}/{len(groups)} of base, a, b")
    for p in paths.values():
        (p / "done").write_text("")
    return paths
