"""Checkpoints for the analysis tests whose deltas are built on purpose: moved MLP neurons, moved layers."""

import torch

NEURONS = [3, 17, 40]
OUTER = [0, 1, 6, 7]
INTER = 64  # intermediate size (> 40)


def _noise(shape, seed, scale=0.05):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def neuron_delta(state, layer, neurons, scales, seed=0, prefix="model.layers"):
    """Copy of state with MLP neurons of one layer moved: rows of gate/up (or fused gate_up), columns of down."""
    out = {k: v.clone() for k, v in state.items()}
    for n, (j, s) in enumerate(zip(neurons, scales)):
        for name, t in out.items():
            if not name.startswith(f"{prefix}.{layer}.mlp."):
                continue
            if "down_proj" in name:
                t[:, j] += _noise(t.shape[0], seed + 100 * n, s)
            elif "gate_up_proj" in name:
                t[j] += _noise(t.shape[1], seed + 100 * n + 1, s)
                t[j + t.shape[0] // 2] += _noise(t.shape[1], seed + 100 * n + 2, s)
            else:
                t[j] += _noise(t.shape[1], seed + 100 * n + (1 if "gate" in name else 2), s)
    return out


def layer_delta(state, layers, seed=1):
    return {k: v + _noise(v.shape, seed + i) if any(f".{layer}." in k for layer in layers) else v.clone()
            for i, (k, v) in enumerate(state.items())}
