"""Neuron-set files (format surgery.neurons/1): which MLP neurons, per layer, with optional scores.

    save_neuron_set("sw.json", result.top_neurons("sw", 50))     # from `surgery diff` or `surgery probe`
    load_neuron_set("sw.json")                                    # {layer: [(index, score or None)]}

Written by `surgery diff --save-neurons` and `surgery probe --save-neurons`; read by the
transplant_neurons and reset_neurons operations. Format: docs/analysis.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import SurgeryError

NEURON_FORMAT = "surgery.neurons/1"
MLP_KINDS = ("mlp_gate", "mlp_up", "mlp_down", "mlp_gate_up")


def save_neuron_set(path, neurons, source: str = "") -> Path:
    """Write [Neuron(layer, index, score)] as a neuron-set JSON file."""
    by_layer: dict[str, list] = {}
    scores: dict[str, list] = {}
    for n in neurons:
        by_layer.setdefault(str(n.layer), []).append(n.index)
        scores.setdefault(str(n.layer), []).append(n.score)
    data = {"format": NEURON_FORMAT, "source": source, "neurons": by_layer, "scores": scores}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return Path(path)


def load_neuron_set(path) -> dict[int, list[tuple[int, float | None]]]:
    """Read a neuron-set file: {layer: [(index, score or None)]}. Errors name the file and the bad entry."""
    path = Path(path)
    if not path.exists():
        raise SurgeryError(f"neuron-set file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise SurgeryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("neurons"), dict):
        raise SurgeryError(f'{path}: expected {{"format": "{NEURON_FORMAT}", "neurons": {{"<layer>": [indices]}}}}')
    if data.get("format", NEURON_FORMAT) != NEURON_FORMAT:
        raise SurgeryError(f"{path}: unsupported format {data['format']!r} (expected {NEURON_FORMAT!r})")
    scores = data.get("scores") or {}
    out = {}
    for key, idx in data["neurons"].items():
        if not str(key).lstrip("-").isdigit():
            raise SurgeryError(f"{path}: neurons: layer key {key!r} is not an integer")
        if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx):
            raise SurgeryError(f"{path}: neurons[{key!r}]: expected a list of neuron indices (integers >= 0)")
        sc = scores.get(key)
        if sc is not None and (not isinstance(sc, list) or len(sc) != len(idx)):
            raise SurgeryError(f"{path}: scores[{key!r}] must be a list as long as neurons[{key!r}]")
        out[int(key)] = [(i, None if sc is None else float(s)) for i, s in zip(idx, sc or [None] * len(idx))]
    return out
