"""extract-lora against mergekit-extract-lora 0.1.5 on the same checkpoints and rank: both adapters load in PEFT,
and per module surgery's reconstruction error is at most mergekit's (equal in fp32, where both take the same SVD;
lower in bf16, where mergekit subtracts in bf16 and surgery in fp32), and equal to the Eckart-Young optimum."""

from __future__ import annotations

import pytest
import torch
from adapter_kit import peft_merged

from helpers import load, perturb, random_state, save_checkpoint, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")
RANK = 5


def _mergekit_extract(base, tuned, out, rank):
    from click.testing import CliRunner
    from mergekit.scripts.extract_lora import main

    res = CliRunner().invoke(main, ["--model", str(tuned), "--base-model", str(base), "--out-path", str(out),
                                    "--max-rank", str(rank)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_extract")
    cfg = tiny_config("llama", architectures=["LlamaForCausalLM"])
    state = random_state(cfg, 0)
    tuned = perturb(state, None, 0.02, seed=7)
    out = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out[name] = (save_checkpoint(root / f"base_{name}", state, cfg, dtype=dt),
                     save_checkpoint(root / f"tuned_{name}", tuned, cfg, dtype=dt))
    return out


def _errors(base, tuned, adapter, names) -> dict[str, float]:
    """Per module: ‖ΔW − ΔW_peft‖ / ‖ΔW‖, ΔW_peft from PEFT's own merge_and_unload of the adapter."""
    merged, w, tw = peft_merged(base, adapter), load(base), load(tuned)
    return {n: float(((tw[n].float() - w[n].float()) - (merged[n] - w[n].float())).norm()
                     / (tw[n].float() - w[n].float()).norm()) for n in names}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_extract_lora_matches_or_beats_mergekit_per_module(pair, tmp_path, dtype):
    from surgery.pipeline import extract_lora

    base, tuned = pair[dtype]
    res = extract_lora(base, tuned, tmp_path / "surgery", rank=RANK, dtype=dtype)
    names = [r.name for r in res.rows]
    assert len(names) == 8 * 7 and {r.rank for r in res.rows} == {RANK}
    mk = _errors(base, tuned, _mergekit_extract(base, tuned, tmp_path / "mergekit", RANK), names)
    ours = _errors(base, tuned, tmp_path / "surgery", names)
    w, tw = load(base), load(tuned)
    for n in names:
        s = torch.linalg.svdvals(tw[n].float() - w[n].float())
        optimum = float(s[RANK:].norm() / s.norm())     # Eckart-Young: no rank-5 matrix is closer
        assert ours[n] <= mk[n] * (1 + 1e-4), (n, ours[n], mk[n])
        assert ours[n] >= optimum * (1 - 1e-4), n
        if dtype == "float32":          # the same SVD of the same delta: the same error, the optimum
            assert ours[n] == pytest.approx(mk[n], rel=1e-4) and ours[n] == pytest.approx(optimum, rel=1e-4)
    if dtype == "bfloat16":             # mergekit rounds ΔW = tuned − base to bf16 before the SVD
        assert sum(ours.values()) < sum(mk.values())
    reported = {r.name: r.rel_error for r in res.rows}
    assert all(abs(reported[n] - ours[n]) < 1e-4 for n in names)   # the report is what PEFT applies
