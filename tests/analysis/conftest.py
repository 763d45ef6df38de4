"""Fixtures shared by the analysis tests."""

import pytest
import torch
from analysis_kit import INTER, NEURONS, OUTER, layer_delta, neuron_delta
from helpers import random_state, save_checkpoint, tiny_config


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base; 'lang' changed only in layers 0,1,6,7; 'neu' changed only in MLP neurons 3,17,40 of layer 4;
    'neu2' changed in neurons 17 (big), 40 (big), 50 (mid), 60 (small) of layer 4; all bf16."""
    root = tmp_path_factory.mktemp("analysis")
    cfg = tiny_config("llama", intermediate_size=INTER)
    base = random_state(cfg, seed=0)
    states = {"base": base, "lang": layer_delta(base, OUTER),
              "neu": neuron_delta(base, 4, NEURONS, [0.05, 0.04, 0.03]),
              "neu2": neuron_delta(base, 4, [17, 40, 50, 60], [0.2, 0.2, 0.1, 0.01], seed=7)}
    return {n: save_checkpoint(root / n, s, cfg, dtype=torch.bfloat16) for n, s in states.items()}
