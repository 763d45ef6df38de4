"""The search tests' shared worlds (read-only): two demo experts whose layer swap at bottom=2, top=2 generated
the text every objective scores, and one finished grid search over all 16 configurations."""

import pytest
import torch
from search_kit import save_word_tokenizer, swap_recipe, swap_search

import surgery


@pytest.fixture(scope="session")
def swap_world(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    ck = demo_dir / "checkpoints"
    for name in ("math", "swahili"):
        surgery.run({"inputs": {"m": str(ck / name)},
                     "operations": [{"arithmetic": {"expr": "20*m", "select": {"modules": ["lm_head"]}}}]}, root / name)
        save_word_tokenizer(root / name)
    surgery.run(swap_recipe(root, 2, 2), root / "generator")
    from transformers import AutoModelForCausalLM

    gen = AutoModelForCausalLM.from_pretrained(root / "generator", dtype=torch.float32).eval()
    torch.manual_seed(0)
    seq = torch.zeros(16, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(63):
            seq = torch.cat([seq, torch.multinomial(torch.softmax(gen(seq).logits[:, -1], -1), 1)], 1)
    docs = [row[1:].tolist() for row in seq]
    (root / "gen.txt").write_text("".join(" ".join(f"w{i:03d}" for i in d) + "\n" for d in docs))
    return root, docs


@pytest.fixture(scope="session")
def grid_run(swap_world, tmp_path_factory):
    root, _ = swap_world
    out = tmp_path_factory.mktemp("grid")
    return surgery.search(swap_search(root), out, write_best=True)

