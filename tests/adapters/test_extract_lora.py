"""LoRA extraction: the adapter loads in peft, its reported error is the real one, ranks by energy, the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from adapter_kit import Q0, peft_merged

from helpers import load, perturb, random_state, save_checkpoint, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ---------------------------------------------------------------------------- extraction

@pytest.fixture(scope="module")
def tuned(ad):
    cfg = tiny_config("llama")
    state = perturb(random_state(cfg, 0), None, 0.02, seed=5)
    return save_checkpoint(ad["root"] / "tuned", state, cfg)


def _rel(a, b):
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_extract_lora_loads_in_peft_and_matches_reported_error(ad, tuned, tmp_path, svd):
    from surgery.pipeline import extract_lora

    res = extract_lora(ad["base"], tuned, tmp_path / "x", rank=6, svd=svd)
    assert len(res.rows) == 8 * 7 and all(r.rank == 6 for r in res.rows)
    assert any(s["name"].endswith("norm.weight") for s in res.skipped)  # norms changed but are not LoRA-able
    merged, w, tw = peft_merged(ad["base"], tmp_path / "x"), load(ad["base"]), load(tuned)
    for r in res.rows:
        true = tw[r.name] - w[r.name]
        assert abs(_rel(true, merged[r.name] - w[r.name]) - r.rel_error) < 1e-4, r.name
        assert 0.05 < r.rel_error < 1.0
    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraConfig.from_pretrained(tmp_path / "x").r == 6  # a config PEFT reads without complaint
    report = json.loads((tmp_path / "x" / "surgery_extract.json").read_text())
    assert report["layers"][0]["tensors"] == 7 and report["rank"] == 6


def test_extract_lora_full_rank_is_exact_and_energy_picks_ranks(ad, tuned, tmp_path):
    from surgery.pipeline import extract_lora

    res = extract_lora(ad["base"], tuned, tmp_path / "full", rank=64, modules=("attn_q",))
    assert {r.rank for r in res.rows} == {32} and max(r.rel_error for r in res.rows) < 1e-5
    res = extract_lora(ad["base"], tuned, tmp_path / "e", energy=0.6)
    assert all(r.energy >= 0.6 for r in res.rows) and len({r.rank for r in res.rows}) > 1
    merged, w, tw = peft_merged(ad["base"], tmp_path / "e"), load(ad["base"]), load(tuned)
    r = max(res.rows, key=lambda r: r.rank)
    assert abs(_rel(tw[r.name] - w[r.name], merged[r.name] - w[r.name]) - r.rel_error) < 1e-4


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_extract_lora_from_an_adapter_recovers_it(ad, tmp_path, svd):
    """A rank-4 adapter's delta is rank 4: extracting at rank 4 reproduces it."""
    from surgery.pipeline import extract_lora

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs:\n  base: {ad['base']}\n  t: {{adapter: {ad['lora_task']}, base: base}}\nrecipient: t\n")
    res = extract_lora(ad["base"], recipe, tmp_path / "x", rank=4, svd=svd)
    assert len(res.rows) == 8 * 4 and max(r.rel_error for r in res.rows) < 1e-5
    merged, ref = peft_merged(ad["base"], tmp_path / "x"), peft_merged(ad["base"], ad["lora_task"])
    assert torch.allclose(merged[Q0], ref[Q0], atol=1e-5)


def test_extract_lora_cli(ad, tuned, tmp_path):
    from click.testing import CliRunner

    from surgery.cli import cli
    res = CliRunner().invoke(cli, ["extract-lora", str(ad["base"]), str(tuned), "-o", str(tmp_path / "c"),
                                   "--rank", "3"])
    assert res.exit_code == 0, res.output
    assert "mean rel err" in res.output and "not in the adapter" in res.output
    res = CliRunner().invoke(cli, ["extract-lora", str(ad["base"]), str(tuned), "-o", str(tmp_path / "d")])
    assert res.exit_code == 1 and res.output.strip() == "error: give --rank R or --energy F"
    res = CliRunner().invoke(cli, ["extract-lora", str(ad["base"]), str(tuned), "-o", str(tmp_path / "d"),
                                   "--energy", "1.5"])
    assert "error: energy must be in (0, 1], got 1.5" in res.output
    res = CliRunner().invoke(cli, ["extract-lora", str(ad["base"]), str(tuned), "-o", str(tmp_path / "d"),
                                   "--energy", "0.5", "--svd", "lowrank"])
    assert "error: svd 'lowrank' needs a rank (--rank)" in res.output


def test_extract_lora_shrinks_an_adamergex_adapter(ad, tmp_path):
    """The exact AdaMergeX adapter has rank 12; extracting it at 12 is lossless, at 4 it reports the loss."""
    from surgery.adapters.adamergex import adamergex_adapter
    from surgery.pipeline import extract_lora

    adamergex_adapter(ad["lora_task"], ad["lora_tgt"], ad["lora_src"], tmp_path / "big", t=1.0)
    exact = extract_lora(ad["base"], tmp_path / "big", tmp_path / "r12", rank=12, modules=("attn_q",))
    assert max(r.rel_error for r in exact.rows) < 1e-5
    small = extract_lora(ad["base"], tmp_path / "big", tmp_path / "r4", rank=4, modules=("attn_q",))
    merged, w = peft_merged(ad["base"], tmp_path / "r4"), load(ad["base"])
    big = peft_merged(ad["base"], tmp_path / "big")
    r = small.rows[0]
    assert r.rel_error > 0.1
    assert abs(_rel(big[r.name] - w[r.name], merged[r.name] - w[r.name]) - r.rel_error) < 1e-4
