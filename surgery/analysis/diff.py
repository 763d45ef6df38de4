"""Where did each expert change? Streaming delta statistics, rankings and overlap.

    result = diff("base/", {"sw": "sw-expert/", "math": "math-expert/"})
    result.layer_ranking("sw")[:4]           # [(7, 0.031), (6, 0.029), (0, 0.027), (1, 0.025)]
    result.top_neurons("sw", k=0.01)         # the 1% most-changed MLP neurons of every layer
    result.neuron_overlap("sw", "math", k=50)
    result.to_json(); result.to_csv("d.csv"); result.plot_heatmap("d.png")

One pass over the tensors, in file order: for each tensor the base and every expert are read,
the deltas Δ = W_expert - W_base are formed in float32 and reduced to a few sums, then dropped.
Memory holds one tensor per checkpoint (plus the next one, read ahead), never a model.
Formulas and the JSON schema: docs/analysis.md.
"""

from __future__ import annotations

import math
from pathlib import Path

from surgery.analysis.accumulate import Acc, ExpertAcc, PairAccs
from surgery.analysis.ranking import (METRICS, DiffResult, ExpertDiff, Neuron, Overlap, PairStats,  # noqa: F401
                                      Stats, TensorStats)
from surgery.core.finite import check_sums_finite
from surgery.analysis.stream import head_vec, neuron_vec, read_ahead, tensor_sums, vec_axis
from surgery.errors import SurgeryError

FLOATING = {"F64", "F32", "F16", "BF16"}  # the dtypes analysed (8-bit floats are left out)


def open_checkpoint(ref):
    from surgery.io.checkpoint import Checkpoint, TensorSource

    return ref if isinstance(ref, TensorSource) else Checkpoint.open(ref)


def diff(base, experts, *, tol: float = 0.0, neurons: bool = True, heads: bool = True, pairs: bool = True,
         include=None, layout=None, progress: bool = False) -> DiffResult:
    """Compare experts to a base, streaming tensor by tensor.

    ``base``: a Checkpoint or anything Checkpoint.open takes. ``experts``: {name: checkpoint} or a list
    (named after their folders). ``tol``: an entry counts as changed when |Δ| > tol. ``include``: optional
    predicate on TensorInfo to analyse only some tensors (the recipe operations use it).
    """
    from surgery.core.layout import Layout

    if tol < 0:
        raise SurgeryError(f"tolerance must be >= 0, got {tol}")
    base_ck = open_checkpoint(base)
    experts = _name_experts(experts)
    if not experts:
        raise SurgeryError("give at least one expert to compare with the base")
    cks = {n: open_checkpoint(r) for n, r in experts.items()}
    layout = layout or Layout.for_checkpoint(base_ck)
    names = [n for n in base_ck.keys() if base_ck.meta[n].dtype in FLOATING]
    infos = {n: layout.info(n) for n in names}
    if include is not None:
        names = [n for n in names if include(infos[n])]
    for en, ck in cks.items():
        _check_compatible(base_ck, ck, en, names)
    heads_spec, heads_note = (layout.heads(base_ck.config) if heads else (None, "not requested"))

    per_expert = {n: ExpertAcc() for n in cks}
    pair_keys = [(a, b) for i, a in enumerate(cks) for b in list(cks)[i + 1:]] if pairs else []
    per_pair = {p: PairAccs() for p in pair_keys}

    from tqdm.auto import tqdm

    from surgery.analysis.stream import Scratch
    from surgery.core.threads import one_thread

    # chunks are cache-sized: one thread computes them best (the read-ahead thread reads meanwhile);
    # torch's thread pool on such small ops mostly waits at barriers, badly so on a busy machine
    scratch = Scratch()
    total_bytes = sum(base_ck.meta[n].nbytes for n in names) * (1 + len(cks))
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="surgery diff", disable=not progress,
              leave=False) as bar, one_thread():
        for name, b_raw, e_raws in read_ahead(names, base_ck, cks):
            info = infos[name]
            axis, target = vec_axis(info, layout, heads_spec)
            if target == "neurons" and not neurons:
                axis = target = None
            bsq, sums, psums = tensor_sums(b_raw, e_raws, tol, axis, pair_keys, scratch)
            check_sums_finite(name, {"": bsq, **{en: s.sq for en, s in sums.items()}}, {"": base_ck, **cks})
            del b_raw, e_raws
            bar.update(base_ck.meta[name].nbytes * (1 + len(cks)))
            numel = math.prod(base_ck.meta[name].shape)
            for en, s in sums.items():
                vec = None
                if info.layer is not None and target == "neurons":
                    vec = neuron_vec(s.vec, info)
                elif info.layer is not None and target == "heads":
                    vec = head_vec(s.vec, info, heads_spec)
                per_expert[en].add(name, info, Acc.of_tensor(numel, s, bsq), vec, target)
            for p, (dot, agree, both) in psums.items():
                per_pair[p].add(info.layer, dot, sums[p[0]].sq, sums[p[1]].sq, agree, both)

    out = {en: per_expert[en].result(en, str(ck.ref)) for en, ck in cks.items()}
    n_layers = layout.num_layers(base_ck.keys(), base_ck.config)
    return DiffResult(str(base_ck.ref), out, {p: acc.result() for p, acc in per_pair.items()}, n_layers, tol,
                      "" if heads_spec else heads_note)


def _name_experts(experts) -> dict:
    if isinstance(experts, dict):
        return dict(experts)
    out = {}
    for ref in experts:
        name = Path(str(getattr(ref, "ref", ref))).name or str(ref)
        while name in out:
            name += "'"
        out[name] = ref
    return out


def _check_compatible(base, ck, name: str, names: list[str]) -> None:
    missing = [n for n in names if n not in ck]
    if missing:
        raise SurgeryError(f"expert {name!r} ({ck.ref}) lacks {len(missing)} tensor(s) of the base, "
                           f"e.g. {missing[0]!r}; is it a fine-tune of the same base model?")
    for n in names:
        if ck.meta[n].shape != base.meta[n].shape:
            raise SurgeryError(f"expert {name!r}: tensor {n!r} has shape {list(ck.meta[n].shape)}, "
                               f"the base has {list(base.meta[n].shape)}")

