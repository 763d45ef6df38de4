"""LoRA extraction: any delta (tuned − base) as a PEFT LoRA adapter, by truncated SVD.

    result = extract_lora("models/base", "models/sw_expert", "out/sw_lora", rank=16)
    result = extract_lora("models/base", "recipes/adamergex.yaml", "out/lora", energy=0.9)  # a recipe's result
    result = extract_lora("models/base", "adapters/big-lora", "out/small-lora", rank=8)      # re-rank an adapter
    for row in result.rows: row.name, row.rank, row.rel_error

For each selected 2-D weight, ΔW = U S Vᵀ is cut to the top k singular values (k = ``rank``, or the
smallest k whose singular values hold ``energy`` of ‖ΔW‖²_F) and stored as B = U_k √S_k,
A = √S_k V_kᵀ with lora_alpha = r (scaling 1), so PEFT's merge gives W + B·A. The relative
reconstruction error ‖ΔW − B·A‖_F / ‖ΔW‖_F is measured on the factors as written (after the cast to
the output dtype) and reported per tensor; it is also saved as ``surgery_extract.json``.
Changed tensors that LoRA cannot carry (norms, biases, MoE experts and routers: ``core.layout.Layout.lora_target``;
embeddings unless selected) are listed in
``result.skipped`` with their relative change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from surgery.adapters.peft import PREFIX
from surgery.adapters.adamergex import rank_config, write_adapter
from surgery.adapters.metadata import base_reference, task_type
from surgery.errors import SurgeryError

DEFAULT_MODULES = ("attn", "mlp")
REPORT_NAME = "surgery_extract.json"


@dataclass
class ExtractedTensor:
    name: str
    module: str
    layer: int | None
    kind: str
    rank: int
    rel_error: float     # ‖ΔW − B·A‖ / ‖ΔW‖
    delta_norm: float    # ‖ΔW‖_F
    energy: float        # fraction of ‖ΔW‖² kept


@dataclass
class ExtractResult:
    output: Path
    rows: list[ExtractedTensor]
    skipped: list[dict] = field(default_factory=list)   # changed tensors not representable: name, rel_change
    unchanged: int = 0

    def by_layer(self) -> list[dict]:
        """Per layer: tensors, mean and max relative error, ranks."""
        out: dict = {}
        for r in self.rows:
            out.setdefault(r.layer, []).append(r)
        return [{"layer": k, "tensors": len(v), "mean_rel_error": sum(r.rel_error for r in v) / len(v),
                 "max_rel_error": max(r.rel_error for r in v), "ranks": sorted({r.rank for r in v})}
                for k, v in sorted(out.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]

    def to_dict(self) -> dict:
        return {"output": str(self.output), "layers": self.by_layer(), "tensors": [asdict(r) for r in self.rows],
                "skipped": self.skipped, "unchanged": self.unchanged}


def extract_lora(base, tuned, out, *, rank: int | None = None, energy: float | None = None,
                 modules=DEFAULT_MODULES, dtype: str = "float32", svd: str = "full", force: bool = False,
                 progress=None, inputs=()) -> ExtractResult:
    """Extract ``tuned − base`` (two ``TensorSource``s; ``surgery.extract_lora`` opens paths, adapter
    directories and recipes) as a LoRA adapter in ``out``. Give ``rank``, ``energy`` or both
    (energy with rank as a cap). ``modules``: module kinds or groups to cover (default attn, mlp).
    ``svd='lowrank'`` uses randomized SVD (torch.svd_lowrank, needs ``rank``): much faster on
    large matrices, slightly above the optimal error, which is still measured and reported.
    ``inputs``: paths the output must not overlap (``surgery.extract_lora`` passes those of base and tuned).
    A NaN/Inf in either model is refused, naming the tensor."""
    import torch

    from surgery.core.finite import count_nonfinite
    from surgery.core.layout import MODULE_GROUPS, MODULE_KINDS, Layout
    from surgery.io.output import check_target
    from surgery.io.safetensors import FLOAT_DTYPES, torch_dtype

    if rank is None and energy is None:
        raise SurgeryError("give a rank (--rank) or an energy fraction (--energy)")
    if rank is not None and rank < 1:
        raise SurgeryError(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise SurgeryError(f"energy must be in (0, 1], got {energy}")
    if svd not in ("full", "lowrank"):
        raise SurgeryError(f"unknown svd method {svd!r} (full, lowrank)")
    if svd == "lowrank" and rank is None:
        raise SurgeryError("svd 'lowrank' needs a rank (--rank), used as the cap with --energy")
    if dtype not in FLOAT_DTYPES:
        raise SurgeryError(f"unknown dtype {dtype!r} ({', '.join(FLOAT_DTYPES)})")
    bad = [m for m in modules if m not in MODULE_KINDS and m not in MODULE_GROUPS]
    if bad:
        raise SurgeryError(f"unknown module kind {bad[0]!r} (kinds: {', '.join(MODULE_KINDS)}; "
                           f"groups: {', '.join(MODULE_GROUPS)})")
    check_target(out, force, inputs=inputs)
    base_ck, tuned_ck = base, tuned
    layout = Layout.for_checkpoint(base_ck)
    missing = [n for n in base_ck.keys() if n not in set(tuned_ck.keys())]
    if missing:
        raise SurgeryError(f"{tuned_ck.ref}: tensor {missing[0]!r} of the base is missing "
                           f"({len(missing)} missing); is it a fine-tune of {base_ck.ref}?")
    out_dt = torch_dtype(FLOAT_DTYPES[dtype])
    tensors, ranks, rows, skipped, unchanged = {}, {}, [], [], 0
    names = base_ck.keys()
    for idx, name in enumerate(names):
        if progress:
            progress(idx, len(names), name)
        w0, w1 = base_ck.get(name), tuned_ck.get_float(name)  # an adapter: exact, not rounded
        if tuple(w0.shape) != tuple(w1.shape):
            raise SurgeryError(f"{tuned_ck.ref}: tensor {name!r} has shape {list(w1.shape)}, base {list(w0.shape)}")
        if not w0.is_floating_point():
            continue
        delta = w1.float() - w0.float()
        if count_nonfinite(delta):
            bad, other = (tuned_ck, base_ck) if count_nonfinite(w1) else (base_ck, tuned_ck)
            n = count_nonfinite(w1 if bad is tuned_ck else w0) or count_nonfinite(delta)
            raise SurgeryError(f"{bad.ref}: tensor {name!r} holds {n} non-finite values (NaN/Inf); "
                               "a LoRA cannot be extracted from it")
        norm = float(delta.norm())
        if norm == 0.0:
            unchanged += 1
            continue
        info = layout.info(name)
        wanted = (info.kind in modules or info.group in modules) and layout.lora_target(name)
        if not (wanted and delta.dim() == 2 and name.endswith(".weight")):
            skipped.append({"name": name, "rel_change": norm / max(float(w0.float().norm()), 1e-30)})
            continue
        module = name[: -len(".weight")]
        emb = info.kind == "embed"
        # PEFT: Linear ΔW = B·A (out, in); Conv1D (fan_in_fan_out) and Embedding ΔW = (B·A)ᵀ
        m = delta.T if (emb or layout.transposed) else delta
        total = norm * norm
        if svd == "lowrank" and rank + 8 < min(m.shape):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # reproducible sketches, global RNG untouched
                u, s, v = torch.svd_lowrank(m, q=rank + 8, niter=4)
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
        k = len(s) if rank is None else min(rank, len(s))
        if energy is not None:
            kept = torch.cumsum(s * s, 0) / total
            k = min(k, int((kept < energy - 1e-12).sum()) + 1)
        root = s[:k].sqrt()
        b = (u[:, :k] * root).to(out_dt)
        a = (root[:, None] * vh[:k]).to(out_dt)
        err = float((m - b.float() @ a.float()).norm()) / norm
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{module}.{a_name}"] = a
        tensors[f"{PREFIX}{module}.{b_name}"] = b
        ranks[module] = k
        rows.append(ExtractedTensor(name, module, info.layer, info.kind, k, err, norm,
                                    float((s[:k] * s[:k]).sum()) / total))
    if progress:
        progress(len(names), len(names), "")
    if not rows:
        raise SurgeryError(f"nothing to extract: no {'/'.join(modules)} weight differs between "
                           f"{base_ck.ref} and {tuned_ck.ref}")
    base_ref, revision = base_reference(base_ck)
    config = _lora_config(ranks, fan_in_fan_out=layout.transposed, base_ref=base_ref, revision=revision,
                          task=task_type(base_ck.config))
    result = ExtractResult(Path(out).resolve(), rows, skipped, unchanged)
    write_adapter(out, tensors, config, force=force, inputs=inputs, extra={REPORT_NAME: {
        "method": "svd", "rank": rank, "energy": energy, "base": str(base_ck.ref), "tuned": str(tuned_ck.ref),
        **{k: v for k, v in result.to_dict().items() if k != "output"}}})
    return result


def _lora_config(ranks: dict[str, int], *, fan_in_fan_out: bool, base_ref: str, revision: str | None,
                 task: str | None) -> dict:
    """adapter_config.json for a plain LoRA. PEFT fills every field not given with its default;
    importing peft only to write this would double the time of a small extraction."""
    return {"peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_ref, "revision": revision,
            "inference_mode": True, **rank_config(ranks), "target_modules": sorted(ranks),
            "lora_dropout": 0.0, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "modules_to_save": None,
            "init_lora_weights": True, "use_dora": False, "lora_bias": False, "layers_to_transform": None,
            "layers_pattern": None, "exclude_modules": None}
