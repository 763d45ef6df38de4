"""Published-style mergekit configs (tests/mergekit_corpus/): mergekit-yaml and `surgery run` give the same model.

Each corpus file is a config as people publish it (mergekit's examples and docs, model cards), with
``${name}`` for the models below. Each runs through mergekit-yaml's entry point (all in ONE subprocess:
mergekit imports take seconds) and through `surgery run`; the outputs are compared tensor by tensor
(bitwise, or statistically for files marked ``# compare: statistical``), with config.json and the
tokenizer files. Header lines ``# expect-warning: ...`` name a warning surgery must give. Files in
errors/ must fail in surgery with the ``# expect-error: ...`` text (mergekit ignores or crashes on them).
A file with ``# lenient-error: ...`` carries a key that mergekit ignores where it stands: surgery refuses
it with that text, and runs it with ``mergekit_lenient=True`` (`--mergekit-lenient`) as mergekit does.

The models: base, a, b, c (tiny llama, bf16, the same 128-token tokenizer), chat (a fine-tune with two
added tokens: 130 rows, and a chat template), base32 (float32) with a PEFT LoRA, qwen (another
architecture) and gpt2 (a GPT-2 whose lm_head is tied to the embeddings: no lm_head tensor). Models
that mergekit may pick as the config or tokenizer donor without a base_model (it picks from a set, so
any of them) have identical tokenizer and config files.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from string import Template

import pytest
import torch

from helpers import load, perturb, random_state, save_checkpoint, tied_state, tiny_config
from mergekit_kit import ENV

CORPUS = Path(__file__).parents[1] / "mergekit_corpus"
CONFIGS = sorted(p.stem for p in CORPUS.glob("*.yml"))
MULTI = sorted(p.stem for p in (CORPUS / "multi").glob("*.yml"))
ERRORS = sorted(p.stem for p in (CORPUS / "errors").glob("*.yml"))
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
ADDED = ["<|im_start|>", "<|im_end|>"]


def save_tokenizer(folder: Path, added: list[str] = (), template: str | None = None) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{j}": j for j in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=64)
    if added:
        fast.add_special_tokens({"additional_special_tokens": list(added)})
    if template:
        fast.chat_template = template
    fast.save_pretrained(folder)


def make_corpus_models(root: Path) -> dict[str, Path]:
    cfg = tiny_config("llama", architectures=["LlamaForCausalLM"])
    base = random_state(cfg, seed=0)
    states = {"base": base, "a": perturb(base, None, 0.02, seed=1), "b": perturb(base, None, 0.02, seed=2),
              "c": perturb(base, None, 0.02, seed=3)}
    paths = {n: save_checkpoint(root / n, s, cfg, dtype=torch.bfloat16) for n, s in states.items()}
    for n in paths:
        save_tokenizer(paths[n])
    # chat: a fine-tune of base with two added tokens (rows 128, 129)
    chat_cfg = tiny_config("llama", architectures=["LlamaForCausalLM"], vocab_size=130)
    chat = perturb(base, None, 0.02, seed=4)
    gen = torch.Generator().manual_seed(5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        chat[name] = torch.cat([chat[name], torch.randn(2, chat[name].shape[1], generator=gen) * 0.02])
    paths["chat"] = save_checkpoint(root / "chat", chat, chat_cfg, dtype=torch.bfloat16)
    save_tokenizer(paths["chat"], ADDED, TEMPLATE)
    # base32 + a PEFT LoRA (float32: PEFT's merge and surgery's adapter view agree bitwise there)
    paths["base32"] = save_checkpoint(root / "base32", base, cfg, dtype=torch.float32)
    save_tokenizer(paths["base32"])
    paths["lora"] = make_lora(paths["base32"], root / "lora")
    qcfg = tiny_config("qwen2", architectures=["Qwen2ForCausalLM"])
    paths["qwen"] = save_checkpoint(root / "qwen", random_state(qcfg, seed=0), qcfg, dtype=torch.bfloat16)
    gcfg = tiny_config("gpt2", architectures=["GPT2LMHeadModel"])
    paths["gpt2"] = save_checkpoint(root / "gpt2", tied_state(gcfg), gcfg)
    save_tokenizer(paths["gpt2"])
    return paths


def make_lora(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(out)
    return out


DRIVER = """
import json, sys
from mergekit.scripts.multimerge import main as multi   # mergekit-multi
from mergekit.scripts.run_yaml import main as run_yaml  # mergekit-yaml
for command, args in json.loads(sys.argv[1]):
    (multi if command == "multi" else run_yaml)(args, standalone_mode=False)
"""


def run_mergekit(jobs: list[tuple[str, list[str]]]) -> None:
    """Run mergekit-yaml / mergekit-multi entry points on every job in ONE process (imports take seconds)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def write(folder: Path, path: Path, models: dict[str, Path]) -> tuple[Path, str]:
    text = Template(path.read_text()).substitute({k: str(v) for k, v in models.items()})
    out = folder / path.name
    out.write_text(text)
    return out, text


def header(text: str, key: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^# {key}: (.*)$", text, re.M)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    models = make_corpus_models(tmp_path_factory.mktemp("corpus_models"))
    root = tmp_path_factory.mktemp("corpus_mk")
    jobs, out = [], {}
    for name in CONFIGS:
        config, text = write(root, CORPUS / f"{name}.yml", models)
        args = ["--random-seed", "3"] if header(text, "compare") else []
        if "+" in text:
            args += ["--lora-merge-cache", str(root / "lora_cache")]
        out[name] = (config, text, root / f"mk_{name}")
        jobs.append(("yaml", [str(config), str(root / f"mk_{name}"), "--no-write-model-card", "--quiet", *args]))
    for name in MULTI:
        config, text = write(root, CORPUS / "multi" / f"{name}.yml", models)
        out[f"multi/{name}"] = (config, text, root / f"mk_{name}")
        jobs.append(("multi", [str(config), "--intermediate-dir", str(root / f"mk_{name}_stages"), "--out-path",
                               str(root / f"mk_{name}"), "--no-write-model-card", "--quiet",
                               "--lora-merge-cache", str(root / "lora_cache")]))
    run_mergekit(jobs)
    return models, out


def assert_same_files(mk: Path, ours: Path) -> None:
    ca = json.loads((mk / "config.json").read_text())
    cb = json.loads((ours / "config.json").read_text())
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (mk / name).is_file() == (ours / name).is_file(), name
        if name.endswith(".json") and (mk / name).is_file():
            a, b = (json.loads((d / name).read_text()) for d in (mk, ours))
            # how the files were made, not what they say: local_files_only (the mergekit process runs offline),
            # is_local (mergekit re-serialises instead of copying when the donor it picks from a set of models
            # is a LoRA-merged copy without tokenizer files; which one it picks varies between runs)
            for key in ("local_files_only", "is_local"):
                a.pop(key, None), b.pop(key, None)
            assert a == b, name
        elif (mk / name).is_file():
            assert (mk / name).read_text() == (ours / name).read_text(), name


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS + [f"multi/{n}" for n in MULTI])
def test_corpus_config_matches_mergekit(name, corpus, tmp_path, monkeypatch):
    from surgery import run

    models, configs = corpus
    config, text, mk_out = configs[name]
    executed = []
    import surgery.pipeline

    real = surgery.pipeline.execute
    monkeypatch.setattr(surgery.pipeline, "execute", lambda plan, *a, **k: executed.append(plan) or real(plan, *a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(config, tmp_path / "out", random_seed=3, mergekit_lenient=bool(header(text, "lenient-error")))
    # one stream for a multi-stage file: earlier stages are computed where the output reads them, unless a
    # LoRA is applied to a stage's output (then that stage is written first)
    assert len(executed) == (2 if "lora_on_stage" in name else 1)
    if "tokenizer" in text and "multi/" not in name:  # the plan says which rows are re-indexed, to how many
        rows = json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"]
        assert f"[rows re-indexed to the {rows}-token output vocabulary]" in result.plan.format(tensors=True)
    messages = [str(w.message) for w in caught]
    for expected in header(text, "expect-warning"):
        assert any(expected in m for m in messages), (expected, messages)
    mk, ours = load(mk_out), load(tmp_path / "out")
    assert sorted(mk) == sorted(ours)
    for n in mk:
        assert (mk[n].dtype, mk[n].shape) == (ours[n].dtype, ours[n].shape), n
    if header(text, "compare"):  # random: the same fraction of entries changed, the same size of change
        base = load(models["base"])

        def changed(out):
            return sum(int((out[n][:128] != base[n][:128]).sum()) for n in out) / sum(
                out[n][:128].numel() for n in out)

        def norm(out):
            return sum(float((out[n][:128].float() - base[n][:128].float()).abs().sum()) for n in out)

        assert abs(changed(mk) - changed(ours)) < 0.01
        assert abs(norm(mk) - norm(ours)) / norm(mk) < 0.03
    else:
        for n in mk:
            assert torch.equal(mk[n], ours[n]), f"{n}: max diff {(mk[n].float() - ours[n].float()).abs().max()}"
    assert_same_files(mk_out, tmp_path / "out")


def test_corpus_covers_what_published_configs_use():
    texts = "\n".join((CORPUS / f"{n}.yml").read_text() for n in CONFIGS)
    for key in ("tokenizer:", "tokenizer_source: union", "tokenizer_source: base", "pad_to_multiple_of",
                "kind: model_token", "kind: zero", "chat_template: auto", "chat_template: chatml", "modules:",
                "+${lora}", "int8_mask", "slices:", "out_dtype", "compare: statistical"):
        assert key in texts, key


@pytest.fixture(scope="module")
def error_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_err_models")
    cfg = tiny_config("llama", architectures=["LlamaForCausalLM"])
    base = random_state(cfg, seed=0)
    models = {n: save_checkpoint(root / n, perturb(base, None, 0.02, seed=i), cfg, dtype=torch.bfloat16)
              for i, n in enumerate(("base", "a", "b", "c"))}
    qcfg = tiny_config("qwen2", architectures=["Qwen2ForCausalLM"])
    models["qwen"] = save_checkpoint(root / "qwen", random_state(qcfg, seed=0), qcfg, dtype=torch.bfloat16)
    return models


@pytest.mark.parametrize("name", [n for n in CONFIGS if header((CORPUS / f"{n}.yml").read_text(), "lenient-error")])
def test_corpus_keys_mergekit_ignores_are_refused_without_lenient(name, tmp_path):
    from surgery import SurgeryError, load_recipe

    path = CORPUS / f"{name}.yml"
    names = re.findall(r"\$\{(\w+)\}", path.read_text())
    text = Template(path.read_text()).substitute({k: f"models/{k}" for k in names})
    (tmp_path / path.name).write_text(text)
    with pytest.raises(SurgeryError) as e:  # the keys are checked before any model is opened
        load_recipe(tmp_path / path.name)
    (expected,) = header(text, "lenient-error")
    assert str(e.value).startswith(f"{tmp_path / path.name}{expected}"), str(e.value)
    assert str(e.value).endswith("(--mergekit-lenient ignores it too, with a warning)")


@pytest.mark.parametrize("name", ERRORS)
def test_corpus_errors_are_clear(name, error_models, tmp_path):
    from surgery import SurgeryError, build_plan

    config, text = write(tmp_path, CORPUS / "errors" / f"{name}.yml", error_models)
    with pytest.raises(SurgeryError) as e:
        build_plan(config)
    message = str(e.value)
    assert message.startswith(str(config)), message
    (expected,) = header(text, "expect-error")
    assert expected in message, message
