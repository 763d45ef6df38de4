"""Mixture-of-experts weights: which expert a tensor belongs to, and mergekit's fused reading of them.

    expert_of("model.layers.0.block_sparse_moe.experts.3.w1.weight")   # 3
    is_stacked("model.layers.0.mlp.experts.gate_up_proj")              # True: all experts along axis 0
    expert_count(config, names)                                        # 8 (0: not a mixture of experts)
    inputs, notes = fuse_inputs(inputs)      # every MoE checkpoint read as mergekit reads it (Recipe.experts: fused)

transformers saves Mixtral and Qwen-MoE experts one tensor per expert and projection
(``...experts.N.w1.weight``); in memory (transformers v5) and in mergekit's architecture files they are one
tensor per layer and projection, every expert stacked along axis 0 (``...mlp.experts.gate_up_proj``,
``[experts, 2·intermediate, hidden]``). mergekit 0.1.5 reads a per-expert checkpoint through transformers'
conversion mapping, merges the fused tensors (so TIES takes its top-k over all experts of a layer at once) and
writes the fused names. ``FusedExperts`` is that reading as a virtual input: its tensors are ``stack_experts``
nodes over the stored per-expert tensors, so a plan over it merges and writes what mergekit does. The layouts
are data (``_data/experts.json``), one entry per model type.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from surgery.core.graph import Op, Ref, register, Node
from surgery.core.virtual import VirtualInput
from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint
from surgery.io.safetensors import TensorMeta


@functools.lru_cache(maxsize=None)
def experts_data() -> dict:
    data = json.loads((Path(__file__).parents[1] / "_data" / "experts.json").read_text())
    data["expert_index"] = re.compile(data["expert_index"])
    data["stacked"] = re.compile(data["stacked"])
    return data


def expert_of(name: str) -> int | None:
    """The expert a per-expert tensor belongs to (None for every other tensor)."""
    m = experts_data()["expert_index"].search(name)
    return int(m["expert"]) if m else None


def is_stacked(name: str) -> bool:
    """True for a tensor holding every expert of its layer along axis 0 (``mlp.experts.down_proj``)."""
    return experts_data()["stacked"].search(name) is not None


def expert_count(config: dict, names, meta: dict | None = None) -> int:
    """Experts per MoE layer: the config's count, else the highest expert index in the names (+1), else the
    first axis of a stacked tensor; 0 for a model without experts."""
    found = [i for i in map(expert_of, names) if i is not None]
    stacked = [n for n in names if is_stacked(n)]
    if not found and not stacked:
        return 0
    for key in experts_data()["count_keys"]:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    if found:
        return max(found) + 1
    return meta[stacked[0]].shape[0] if meta and stacked[0] in meta else 0


def parse_experts(spec: list[int], count: int) -> tuple[list[int], int | None]:
    """Expert indices (negative ones count from the end) -> (sorted indices, position of the first bad one)."""
    out = []
    for i, e in enumerate(spec):
        if not -count <= e < count:
            return [], i
        out.append(e % count)
    return sorted(set(out)), None


def format_experts(index) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    index, parts, i = sorted(index), [], 0
    while i < len(index):
        j = i
        while j + 1 < len(index) and index[j + 1] == index[j] + 1:
            j += 1
        parts.append(str(index[i]) if i == j else f"{index[i]}-{index[j]}")
        i = j + 1
    return ",".join(parts)


# ---------------------------------------------------------------------------- the stack_experts op

def _stack_shape(shapes: list[tuple], p: dict) -> tuple:
    n = p["parts"]
    first = shapes[:n]
    for e in range(p["experts"]):
        group = shapes[e * n:(e + 1) * n]
        if group != first or any(len(s) < 1 or s[1:] != first[0][1:] for s in group):
            raise SurgeryError(f"expert {e}'s tensors {[list(s) for s in group]} don't line up with expert 0's "
                               f"{[list(s) for s in first]}")
    return (p["experts"], sum(s[0] for s in first), *first[0][1:])


def _stack(tensors, p: dict):
    import torch

    n = p["parts"]
    return torch.stack([torch.cat(tensors[e * n:(e + 1) * n], 0) if n > 1 else tensors[e * n]
                        for e in range(p["experts"])], 0)


def _describe_stack(args: list[str], p: dict) -> str:
    return f"{args[0]}[{p['experts']} experts: {'+'.join(p['labels'])}]"


# raw: the stored bytes, stacked (mergekit converts to its merge dtype afterwards, as the merge op does)
register("stack_experts", Op(shape=_stack_shape, compute=_stack, describe=_describe_stack, raw=True))


# ---------------------------------------------------------------------------- the fused view

class FusedExperts(VirtualInput):
    """A checkpoint read as mergekit reads it: per-expert tensors fused, renamed tensors renamed."""

    def __init__(self, name: str, stored, stored_input: str, layout: dict):
        self.name, self.stored, self.stored_input = name, stored, stored_input
        self.ref, self.revision = stored.ref, stored.revision
        self._sources: dict[str, str | tuple] = {}   # our name -> stored name, or (labels, stored names, count)
        self.meta: dict[str, TensorMeta] = {}
        renames = [tuple(r) for r in layout["renames"]]
        parts = [(t["name"], k, _part_regex(p), p.split(".{e}.")[-1].removesuffix(".weight"))
                 for t in layout["tensors"] for k, p in enumerate(t["parts"])]
        groups: dict[str, tuple] = {}   # fused name -> (part labels, [{expert: stored name} per part])
        for stored_name in stored.keys():
            name = stored_name
            for old, new in renames:
                name = name.replace(old, new)
            hit = next(((t, k, m) for t, k, rx, _ in parts if (m := rx.match(name))), None)
            if hit is None:
                self._sources[name] = stored_name
                continue
            template, part, m = hit
            fused, expert = m["pre"] + template, int(m["e"])
            if fused not in groups:
                labels = [label for t, _, _, label in parts if t == template]
                groups[fused] = self._sources[fused] = (labels, [{} for _ in labels])
            groups[fused][1][part][expert] = stored_name
        for name, src in self._sources.items():
            if isinstance(src, str):
                self.meta[name] = stored.meta[src]
                continue
            labels, by_part = src
            count = 1 + max(max(p) for p in by_part if p)
            for k, p in enumerate(by_part):
                missing = [e for e in range(count) if e not in p]
                if missing:
                    raise SurgeryError(f"{stored.ref}: {name} needs {labels[k]} of every expert (0-{count - 1}), "
                                       f"but expert {missing[0]}'s is missing")
            order = [by_part[k][e] for e in range(count) for k in range(len(by_part))]
            self._sources[name] = (labels, order, count)
            metas = [stored.meta[n] for n in order]
            if len({m.dtype for m in metas}) > 1:
                raise SurgeryError(f"{stored.ref}: the expert tensors of {name} mix dtypes "
                                   f"({', '.join(sorted({m.dtype for m in metas}))})")
            try:
                shape = _stack_shape([tuple(m.shape) for m in metas], {"experts": count, "parts": len(by_part)})
            except SurgeryError as e:
                raise SurgeryError(f"{stored.ref}: {name}: {e}") from None
            self.meta[name] = TensorMeta(metas[0].dtype, shape)

    @property
    def fused(self) -> dict[str, tuple]:
        """Fused name -> (part labels, stored names in stacking order, expert count)."""
        return {n: s for n, s in self._sources.items() if isinstance(s, tuple)}

    # the checkpoint interface
    @property
    def root(self) -> Path:
        return self.stored.root

    @property
    def config(self) -> dict:
        return self.stored.config

    @property
    def files(self) -> list:
        return []   # the stored input carries the hashes

    def file_hashes(self) -> dict:
        return {}

    def keys(self) -> list[str]:
        return list(self._sources)

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def close(self) -> None:
        self.stored.close()

    def expand(self, ref: Ref):
        src = self._sources.get(ref.name, ref.name)  # a stored name (an adapter over this input): itself
        if isinstance(src, str):
            return Ref(self.stored_input, src, ref.layer, ref.out_layer, self.name)
        labels, order, count = src
        return Node("stack_experts", [Ref(self.stored_input, n, ref.layer, ref.out_layer, self.name) for n in order],
                    {"experts": count, "parts": len(labels), "labels": labels})

    def get(self, name: str):
        from surgery.core.graph import evaluate

        return evaluate(self.expand(Ref(self.name, name)), lambda r: self.stored.get(r.name))

    def get_float(self, name: str):
        return self.get(name).float()


def _part_regex(part: str) -> re.Pattern:
    body = re.escape(part).replace(re.escape("{e}"), r"(?P<e>\d+)")
    return re.compile(r"^(?P<pre>(?:.*\.)?)" + body + "$")


def fuse_inputs(inputs: dict) -> tuple[dict, list[str]]:
    """Every input whose architecture has a fused layout (``_data/experts.json``) and stores its experts one
    tensor per expert, read fused (``FusedExperts``; the stored checkpoint becomes the hidden input
    ``name:stored``); other inputs as they are. Returns the inputs and lines for ``surgery plan``."""
    table = experts_data()["fused"]
    out, fused, unknown = {}, {}, {}
    for name, ck in inputs.items():
        if not isinstance(ck, Checkpoint) or not any(expert_of(n) is not None for n in ck.keys()):
            out[name] = ck
            continue
        model_type = ck.config.get("model_type", "")
        if model_type not in table:
            out[name] = ck
            unknown.setdefault(model_type or "(no model_type)", []).append(name)
            continue
        view = FusedExperts(name, ck, f"{name}:stored", table[model_type])
        out[name], out[view.stored_input] = view, ck
        if view.fused:
            first = next(iter(view.fused.values()))
            what = ", ".join(sorted({f"{'+'.join(labels)} -> {'.'.join(n.split('.')[-2:])}"
                                     for n, (labels, _, _) in view.fused.items()}))
            fused.setdefault(f"{first[2]} experts per layer stacked ({what})", []).append(name)
    notes = [f"experts of {', '.join(map(repr, names))} read fused, as mergekit reads them: {what}; a merge "
             "sees every expert of a layer at once" for what, names in fused.items()]
    notes += [f"experts of {', '.join(map(repr, names))} stay one tensor per expert: no fused layout is known "
              f"for {model_type!r} (surgery/_data/experts.json)" for model_type, names in unknown.items()]
    return out, notes


def stored_notes(recipient) -> list[str]:
    """``surgery plan``'s line for a recipient whose experts stay as stored, one tensor per expert."""
    names = recipient.keys()
    if not any(expert_of(n) is not None for n in names):
        return []
    return [f"experts: {expert_count(recipient.config, names)} per layer, one tensor per expert as stored; a merge "
            "merges each expert's tensors alone (recipe 'experts: fused' reads them as mergekit does)"]
