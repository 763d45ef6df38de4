"""Cost of the NaN/Inf check on computed tensors: `surgery run` on a ~200 MB float32 checkpoint with the
check (default) and with --allow-nonfinite (no check), interleaved, 3 repeats, median wall and CPU time.

    PYTHONPATH=. python benchmarks/bench_finite.py
"""

import shutil
import statistics as st
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_config  # noqa: E402

import surgery  # noqa: E402

SHAPES = [("mlp.up_proj", (2048, 512)), ("mlp.gate_proj", (2048, 512)), ("mlp.down_proj", (512, 2048)),
          ("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (512, 512)), ("self_attn.v_proj", (512, 512)),
          ("self_attn.o_proj", (512, 512))]


def main():
    root = Path(tempfile.mkdtemp())
    src = root / "big"
    src.mkdir()
    tiny_config("llama", hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8,
                num_hidden_layers=8).save_pretrained(src)
    state = {"model.embed_tokens.weight": torch.randn(128, 512)}
    state.update({f"model.layers.{i}.{k}.weight": torch.randn(s) for i in range(8) for k, s in SHAPES})
    save_file(state, str(src / "model.safetensors"))
    recipe = {"inputs": {"a": str(src)}, "operations": [{"arithmetic": {"expr": "a * 0.7"}}]}
    times = {True: [], False: []}
    for rep in range(3):
        for allow in (False, True):
            out = root / f"o{rep}{allow}"
            w, c = time.perf_counter(), time.process_time()
            surgery.run(recipe, out, allow_nonfinite=allow)
            times[allow].append((time.perf_counter() - w, time.process_time() - c))
            shutil.rmtree(out)
    shutil.rmtree(root)
    med = {a: (st.median(t[0] for t in v), st.median(t[1] for t in v)) for a, v in times.items()}
    print(f"{'run':<28}{'wall s':>8}{'cpu s':>8}")
    print(f"{'checked (default)':<28}{med[False][0]:>8.3f}{med[False][1]:>8.3f}")
    print(f"{'--allow-nonfinite':<28}{med[True][0]:>8.3f}{med[True][1]:>8.3f}")
    print(f"{'ratio checked / unchecked':<28}{med[False][0] / med[True][0]:>8.3f}{med[False][1] / med[True][1]:>8.3f}")


if __name__ == "__main__":
    main()
