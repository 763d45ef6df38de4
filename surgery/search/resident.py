"""One model per search worker, patched from trial to trial.

    resident = ResidentModel(device="cpu", dtype="float32")
    model, tokenizer = resident.load(plan_a)    # first trial: built by surgery.models.load_model
    model, tokenizer = resident.load(plan_b)    # later trials: only the tensors whose op tree differs are computed

Each parameter or buffer the model holds carries the signature of the plan entry that produced it: its op tree
with every ref replaced by the file, file stamp and tensor name it reads, plus its output dtype. A trial computes
(``core.execute.compute``, cast as the writer casts) only the entries whose signature differs from what the model
holds, which re-patches the tensors the previous trial changed back to what this trial needs (the recipient's,
for instance): the weights are bitwise those `surgery run` writes for the trial's recipe. A plan whose patched
config or tensor names differ from the model's (``stack`` with another layer count, another config source), or an
input that is not a plain checkpoint (its tensors cannot be named by file), rebuilds or recomputes as needed.
"""

from __future__ import annotations

import gc
import json

from surgery.core.graph import Node, Ref


class ResidentModel:
    """The worker's model and tokenizer, and the signature of every tensor the model holds."""

    def __init__(self, *, device: str = "cpu", dtype: str | None = None, tokenizer=None):
        self.device, self.dtype, self.tokenizer_source = device, dtype, tokenizer
        self.model = self.tokenizer = None
        self.config: dict | None = None
        self.held: dict[str, object] = {}   # tensor name -> signature of the bytes the model holds
        self.patched = 0                     # tensors computed by the last load (all of them when built)

    def load(self, plan):
        """(model, tokenizer) holding ``plan``'s output; closes the plan's inputs."""
        try:
            config = output_config(plan)
            wanted = {e.name: signature(e, plan.inputs) for e in plan.entries}
            if self.model is None or config != self.config or wanted.keys() != self.held.keys():
                self._build(plan, config, wanted)
            else:
                self._patch(plan, wanted)
        finally:
            for ck in plan.inputs.values():
                ck.close()
        return self.model, self.tokenizer

    def _build(self, plan, config: dict, wanted: dict) -> None:
        from surgery.models import load_model

        self.model = self.tokenizer = None
        self.held = {}
        gc.collect()  # the old model first: memory holds one model
        self.model, self.tokenizer = load_model(plan, device=self.device, dtype=self.dtype,
                                                tokenizer=self.tokenizer_source, progress=False)
        self.config, self.held, self.patched = config, wanted, len(wanted)

    def _patch(self, plan, wanted: dict) -> None:
        from surgery.core.execute import compute
        from surgery.io.safetensors import torch_dtype
        from surgery.models import torch_dtype_of

        cast = torch_dtype_of(self.dtype)
        slots = slots_of(self.model)
        self.patched = 0
        for e in plan.entries:
            sig = wanted[e.name]
            if sig is not None and self.held.get(e.name) == sig:
                continue
            t = compute(e, plan.inputs)
            t = t if t.dtype == torch_dtype(e.dtype) else t.to(torch_dtype(e.dtype))  # the writer's cast
            t = t.detach().to("cpu").contiguous()
            if cast is not None and t.is_floating_point():
                t = t.to(cast)                                                        # load_model's cast
            module, attr, is_param = slots[e.name]
            if is_param:
                module._parameters[attr].data = t.to(self.device)  # tied parameters share the object: both follow
            else:
                module._buffers[attr] = t.to(self.device)
            self.held[e.name] = sig
            self.patched += 1


def output_config(plan) -> dict:
    """The output's config.json as `surgery run` writes it (what the model is built from)."""
    from surgery.models import _config

    path = plan.inputs[plan.config_source].root / "config.json"
    return json.loads(json.dumps(_config(path, plan))) if path.is_file() else {}


def signature(entry, inputs):
    """A hashable identity of the entry's bytes, or None when an input cannot name its tensors by file."""
    node = tree(entry.node, inputs)
    return None if node is None else (node, entry.dtype, tuple(entry.shape))


def tree(node, inputs):
    if isinstance(node, Ref):
        from surgery.io.checkpoint import Checkpoint

        ck = inputs.get(node.input)
        if not isinstance(ck, Checkpoint) or node.name not in ck.weight_map:
            return None
        file = ck.weight_map[node.name]
        return ("ref", str(file), ck.stamps.get(file), node.name)
    if isinstance(node, Node):
        args = [tree(a, inputs) for a in node.args]
        if any(a is None for a in args):
            return None
        return (node.op, tuple(args), frozen(node.params))
    return None


def frozen(value):
    """Parameters as a hashable value; arrays by dtype, shape and a digest of their bytes (repr abbreviates)."""
    if isinstance(value, dict):
        return tuple((str(k), frozen(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    if hasattr(value, "tobytes") or type(value).__module__.startswith("torch"):
        import hashlib

        import numpy as np

        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        return ("array", str(array.dtype), array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())
    return repr(value)


def slots_of(model) -> dict:
    from surgery.models import _slots

    return _slots(model)
