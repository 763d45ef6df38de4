import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import perturb, random_state, save_checkpoint, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A tiny llama base plus experts: 'lang' changed in layers 0,1,6,7; 'task' in 3,4; 'en' everywhere.

    Stored in bfloat16, as most real checkpoints are.
    """
    import torch

    root = tmp_path_factory.mktemp("family")
    cfg = tiny_config("llama")
    base = random_state(cfg, seed=0)
    states = {"base": base, "lang": perturb(base, [0, 1, 6, 7], 0.05, seed=1),
              "task": perturb(base, [3, 4], 0.05, seed=2), "en": perturb(base, None, 0.01, seed=3)}
    return {n: save_checkpoint(root / n, s, cfg, dtype=torch.bfloat16) for n, s in states.items()}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from surgery.demo import make_demo

    root = tmp_path_factory.mktemp("demo")
    make_demo(root / "checkpoints")
    return root
