"""Tiny demo checkpoints with meaningful deltas, made on the spot (no network).

    paths = make_demo("demo/checkpoints")   # {'base': ..., 'math': ..., 'swahili': ..., 'english': ...}

A random 8-layer Llama (hidden 64) is the base. Each expert is the base plus low-rank
(rank-4) updates whose size depends on the layer, like a fine-tune that moved some layers
more than others:
  - swahili, english: language experts, changed mostly in the outer layers (0, 1, 6, 7) and in
    the embeddings; english less than swahili;
  - math: a task expert, changed mostly in the middle layers (3, 4), less in 2 and 5.
Beside them, lora-swahili, lora-english and lora-math are PEFT LoRA adapters (rank 4) of the
experts' attention and MLP updates, extracted from the checkpoints.
Every other layer moves by a small amount, so nothing is exactly zero. Each checkpoint has a
byte-level tokenizer (see ``save_byte_tokenizer``), so `surgery eval` runs on them. The same seed gives
the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

N_LAYERS = 8
# relative size of the update per layer: ||ΔW|| / ||W|| (about)
PROFILES = {
    "swahili": [0.30, 0.25, 0.02, 0.02, 0.02, 0.02, 0.25, 0.30],
    "english": [0.10, 0.08, 0.01, 0.01, 0.01, 0.01, 0.08, 0.10],
    "math": [0.02, 0.02, 0.10, 0.30, 0.30, 0.10, 0.02, 0.02],
}
EMBED_SCALE = {"swahili": 0.2, "english": 0.05, "math": 0.01}


def demo_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=N_LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, dtype="bfloat16")


def make_demo(folder: str | Path, seed: int = 0, dtype: str = "bfloat16") -> dict[str, Path]:
    """Write base + three experts under ``folder``; return name -> directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    config = demo_config()
    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    out = {}
    for name in ["base", *PROFILES]:
        gen = torch.Generator().manual_seed(seed * 1000 + len(out))
        state = base if name == "base" else _expert(base, PROFILES[name], EMBED_SCALE[name], gen)
        path = folder / name
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(path)
        save_byte_tokenizer(path)
        (path / "README.md").write_text(f"surgery demo checkpoint '{name}' (seed {seed}); see surgery/demo.py\n")
        out[name] = path
    (folder / "profiles.json").write_text(json.dumps(PROFILES, indent=2))
    make_demo_adapters(folder, out)
    return out


def save_byte_tokenizer(folder: str | Path) -> None:
    """A byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>; no merges) saved into ``folder``,
    so `surgery eval` can run the demo checkpoints (vocab 512) on any UTF-8 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            model_max_length=256).save_pretrained(folder)


def make_demo_adapters(folder: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """LoRA adapters lora-<expert> beside the checkpoints: each expert's rank-4 updates to the
    attention and MLP projections, extracted by SVD (recipes/madx_adapters.yaml uses them)."""
    from surgery.pipeline import extract_lora

    made = {}
    for name in PROFILES:
        made[f"lora-{name}"] = extract_lora(paths["base"], paths[name], folder / f"lora-{name}", rank=4,
                                            force=True).output
    return made


def _expert(base: dict, profile: list[float], embed_scale: float, gen) -> dict:
    import re

    import torch

    out = {}
    for k, w in base.items():
        m = re.search(r"\.layers\.(\d+)\.", k)
        scale = profile[int(m[1])] if m else (embed_scale if "embed" in k or "lm_head" in k else 0.01)
        if w.dim() == 2:
            r = 4
            u = torch.randn(w.shape[0], r, generator=gen)
            v = torch.randn(r, w.shape[1], generator=gen)
            delta = u @ v
        else:
            delta = torch.randn(w.shape, generator=gen)
        delta *= scale * w.norm() / delta.norm()
        out[k] = w + delta
    return out


DEMO_RECIPE = """\
# Written by `surgery demo`. Bandarkar et al. 2024 layer swap on the demo checkpoints:
# the math expert keeps its middle layers and receives the Swahili expert's
# bottom 2 and top 2 layers, with 1-layer transition zones blended 50/50.
inputs:
  math: checkpoints/math
  swahili: checkpoints/swahili
recipient: math
operations:
  - layer_swap:
      donor: swahili
      bottom: 2
      top: 2
      transition: 1
"""


def check_loads(path: str | Path) -> str:
    """Load the output with transformers (``load_model``: from_pretrained) and run one forward pass; describe
    the result."""
    import torch

    from surgery.models import load_model

    model, _ = load_model(path)
    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits
    finite = bool(torch.isfinite(logits).all())
    return (f"loaded with transformers {type(model).__name__}: logits {tuple(logits.shape)}, "
            f"{'all finite' if finite else 'NOT FINITE'}")
