"""New PEFT adapters from old ones: AdaMergeX in adapter space, and the adapter writer.

    adamergex_adapter("ner_en", "lm_sw", "lm_en", "out/ner_sw", t=1.0)            # exact, rank r1+r2+r3
    adamergex_adapter("ner_en", "lm_sw", "lm_en", "out/ner_sw", mode="factors")   # original: A, B added

AdaMergeX (Zhao et al. 2024): A_tgt,task = A_src,task ⊕ t·(A_tgt,ref ⊖ A_src,ref).
- LoRA, mode 'delta': ΔW_new = ΔW_task + t·ΔW_tgt − t·ΔW_src exactly, written as one LoRA whose
  factors are the three stacked ([B₁s₁, t·B₂s₂, −t·B₃s₃] · [A₁; A₂; A₃], scaling 1).
- LoRA, mode 'factors': A_new = A_task + t(A_tgt − A_src), B likewise (same ranks and scalings needed).
- (IA)³: l_new = l_task ⊙ (t·(l_tgt / l_src − 1) + 1).
The result loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from surgery.adapters.metadata import base_config, resolve_base_path, task_type
from surgery.adapters.peft import CONFIG_NAME, PREFIX, WEIGHTS_NAME, PeftAdapter
from surgery.adapters.view import adamergex_combine
from surgery.errors import SurgeryError


@dataclass
class AdapterResult:
    output: Path
    peft_type: str
    modules: int
    ranks: dict[str, int]   # module -> rank (LoRA)


def write_adapter(out, tensors: dict, config: dict, *, force: bool = False, extra: dict | None = None,
                  inputs=()) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (+ extra JSON files, the first one being the
    report of how the adapter was made) and an adapter card (README.md), atomically; ``out`` must not
    overlap ``inputs``."""
    from safetensors.torch import save_file

    from surgery.io.output import atomic_dir, write_json

    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_dir(out, force=force, inputs=inputs, size=size, command="adapter") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra or {}).items():
            write_json(tmp / name, data)
        from surgery.adapters.adapter_card import write_adapter_card

        write_adapter_card(tmp, config, next(iter((extra or {}).values()), {}), name=Path(out).name)
    return Path(out).resolve()


def rank_config(ranks: dict[str, int]) -> dict:
    """r, lora_alpha (= r, so scaling is 1) and the patterns for modules of another rank."""
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False}


def adamergex_adapter(task, target_ref, source_ref, out, *, t: float = 1.0, mode: str = "delta",
                      dtype: str | None = None, force: bool = False) -> AdapterResult:
    """AdaMergeX on adapter directories, written as a new adapter directory."""
    import torch

    from surgery.io.output import check_target
    from surgery.io.safetensors import FLOAT_DTYPES, torch_dtype

    ads = [PeftAdapter.open(p) for p in (task, target_ref, source_ref)]
    check_target(out, force, inputs=[a.path for a in ads])
    kinds = {a.peft_type for a in ads}
    if len(kinds) != 1:
        raise SurgeryError("AdaMergeX needs adapters of one type; got "
                           + ", ".join(f"{a.path.name}: {a.peft_type}" for a in ads))
    if mode not in ("delta", "factors"):
        raise SurgeryError(f"unknown mode {mode!r} (delta, factors)")
    fifo = {bool(a.config.get("fan_in_fan_out")) for a in ads}
    if len(fifo) != 1:
        raise SurgeryError("the adapters disagree on fan_in_fan_out")
    kind = kinds.pop()
    mods = [a.modules() for a in ads]
    out_dtype = torch_dtype(FLOAT_DTYPES[dtype]) if dtype else None
    weights = (1.0, t, -t)

    def get(i, key):
        return ads[i].tensors.get(key).float()

    tensors, ranks = {}, {}
    config = dict(ads[0].config)
    if kind == "IA3" or mode == "factors":
        sets = [set(m) for m in mods]
        if not sets[0] == sets[1] == sets[2]:
            diff = sorted((sets[0] | sets[1] | sets[2]) - (sets[0] & sets[1] & sets[2]))
            raise SurgeryError(f"{'(IA)³' if kind == 'IA3' else 'factor-wise'} AdaMergeX needs the same modules "
                               f"in all three adapters; {len(diff)} differ, e.g. {diff[0]!r}")
        for module, roles in mods[0].items():
            if set(roles) != set(mods[1][module]) or set(roles) != set(mods[2][module]):
                raise SurgeryError(f"module {module!r} has different tensors in the three adapters")
            if kind == "LORA" and ("lora_A" in roles or "lora_embedding_A" in roles):
                rs = [a.rank_alpha(module)[0] for a in ads]
                sc = [a.scaling(module) for a in ads]
                if len(set(rs)) != 1 or len(set(sc)) != 1:
                    raise SurgeryError(f"module {module!r}: factor-wise AdaMergeX needs equal ranks and scalings; "
                                       f"got ranks {rs}, scalings {sc} (use mode 'delta')")
            for role, key in roles.items():
                vals = [get(i, mods[i][module][role]) for i in range(3)]
                new = adamergex_combine(*vals, t, multiplicative=role == "ia3_l")
                tensors[key] = new.to(out_dtype or ads[0].tensors.get(key).dtype)
    else:
        for module in sorted(set().union(*mods)):
            parts = [(i, mods[i][module]) for i in range(3) if module in mods[i]]
            emb = any("lora_embedding_A" in r for _, r in parts)
            a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
            lora_parts = [(i, r) for i, r in parts if a_role in r]
            if lora_parts:
                a = torch.cat([get(i, r[a_role]) for i, r in lora_parts], dim=0)
                b = torch.cat([get(i, r[b_role]) * (weights[i] * ads[i].scaling(module)) for i, r in lora_parts], dim=1)
                suffix = "" if emb else ".weight"
                dt = out_dtype or ads[lora_parts[0][0]].tensors.get(lora_parts[0][1][a_role]).dtype
                tensors[f"{PREFIX}{module}.{a_role}{suffix}"] = a.to(dt)
                tensors[f"{PREFIX}{module}.{b_role}{suffix}"] = b.to(dt)
                ranks[module] = a.shape[0]
                bias_parts = [(i, r) for i, r in lora_parts if "lora_bias" in r]
                if bias_parts:
                    tensors[f"{PREFIX}{module}.lora_B.bias"] = sum(
                        get(i, r["lora_bias"]) * (weights[i] * ads[i].scaling(module)) for i, r in bias_parts).to(dt)
                    config["lora_bias"] = True
            whole = sorted({role for _, r in parts for role in r if role.startswith("full:")})
            for role in whole:
                have = [i for i, r in parts if role in r]
                key = mods[have[0]][module][role]
                if have == [0]:
                    tensors[key] = ads[0].tensors.get(key)
                elif have == [0, 1, 2]:
                    vals = [get(i, mods[i][module][role]) for i in range(3)]
                    new = adamergex_combine(*vals, t, multiplicative=False)
                    tensors[key] = new.to(out_dtype or ads[0].tensors.get(key).dtype)
                else:
                    raise SurgeryError(f"tensor {key!r} is saved whole by only some of the adapters "
                                       f"({', '.join(ads[i].path.name for i in have)}); cannot combine it")
        config.update(rank_config(ranks))
        # explicit module names; layer filters of the task adapter would drop the references' modules
        config.update(target_modules=sorted(ranks), layers_to_transform=None, layers_pattern=None,
                      exclude_modules=None)
    base = resolve_base_path(ads[0].config.get("base_model_name_or_path"), ads[0].path)
    config["base_model_name_or_path"] = base
    config["task_type"] = ads[0].config.get("task_type") or task_type(base_config(base))
    write_adapter(out, tensors, config, force=force, inputs=[a.path for a in ads], extra={"surgery_adapter.json": {
        "method": "adamergex", "mode": mode if kind == "LORA" else "multiplicative", "t": t,
        "task": str(ads[0].path), "target_ref": str(ads[1].path), "source_ref": str(ads[2].path)}})
    return AdapterResult(Path(out).resolve(), kind, len(set().union(*mods)), ranks)
