"""PEFT adapter directories: reading adapter_config.json + adapter_model.safetensors and mapping
every adapter tensor to the base tensor it changes (with rank and shape checks).

    adapter = PeftAdapter.open("adapters/lora-sw").resolve(Checkpoint.open("models/base"))
    adapter.terms["model.layers.0.self_attn.q_proj.weight"]   # [Term(kind='lora', keys=(A, B), scaling=2.0, ...)]

``surgery.adapters`` turns the terms into op trees and a checkpoint-like view.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from surgery.adapters.peft_config import check_config, targeted
from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint
from surgery.io.files import existing_path


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUPPORTED = ("LORA", "IA3")
# config fields that change what the weights mean and that this module does not implement
UNSUPPORTED_FIELDS = {"use_dora": "DoRA", "layer_replication": "layer_replication",
                      "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters",
                      "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA"}


# ---------------------------------------------------------------------------- adapter files

@dataclass
class Term:
    """What an adapter does to one base tensor."""

    kind: str                 # 'lora' | 'ia3' | 'ia3_bias' | 'lora_bias' | 'replace'
    keys: tuple[str, ...]     # raw adapter tensors: (A, B) | (l,) | (bias,) | (full tensor,)
    module: str               # PEFT module name, e.g. 'model.layers.0.self_attn.q_proj'
    scaling: float = 1.0
    fan_in_fan_out: bool = False
    rank: int = 0


@dataclass
class PeftAdapter:
    """An adapter directory: its config, its raw tensors, and (after ``resolve``) per-tensor terms."""

    path: Path
    config: dict
    tensors: Checkpoint
    terms: dict[str, list[Term]] = field(default_factory=dict)   # base tensor name -> terms

    @property
    def peft_type(self) -> str:
        return self.config["peft_type"]

    @classmethod
    def open(cls, path, base_dir: Path | None = None) -> "PeftAdapter":
        p = Path(path).expanduser()
        if not p.is_absolute() and base_dir is not None and os.path.lexists(base_dir / p):
            p = base_dir / p
        if os.path.lexists(p):
            existing_path(p, str(path))  # a symlink loop or a dangling link: say so
        if not p.is_dir():
            raise SurgeryError(f"adapter not found: {str(path)!r} is not a directory")
        if not (p / CONFIG_NAME).is_file():
            raise SurgeryError(f"{p}: no {CONFIG_NAME}; not a PEFT adapter directory")
        if not (p / WEIGHTS_NAME).is_file():
            extra = " (only adapter_model.bin; convert it to safetensors)" if (p / "adapter_model.bin").exists() else ""
            raise SurgeryError(f"{p}: no {WEIGHTS_NAME}{extra}")
        try:
            config = json.loads((p / CONFIG_NAME).read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise SurgeryError(f"{p / CONFIG_NAME}: invalid JSON: {str(e).splitlines()[0]}") from None
        check_config(config, str(p / CONFIG_NAME))
        kind = str(config.get("peft_type", "")).upper()
        if kind not in SUPPORTED:
            raise SurgeryError(f"{p}: unsupported PEFT type {config.get('peft_type')!r} "
                               f"(supported: {', '.join(SUPPORTED)})")
        config["peft_type"] = kind
        for key, what in UNSUPPORTED_FIELDS.items():
            if config.get(key):
                raise SurgeryError(f"{p}: {what} adapters ({key}={config[key]!r}) are not supported; "
                                   "plain LoRA and (IA)³ are")
        tensors = Checkpoint.open(p / WEIGHTS_NAME)
        tensors.ref = str(path)  # as the user wrote it, like a checkpoint input's ref
        return cls(p.resolve(), config, tensors)

    # ---- raw key -> module --------------------------------------------------
    def modules(self) -> dict[str, dict[str, str]]:
        """PEFT module name -> {role: raw key}; roles lora_A, lora_B, lora_bias, ia3_l,
        lora_embedding_A/B, or
        'full:<param>' for tensors saved whole (modules_to_save, trained biases)."""
        found: dict[str, dict[str, str]] = {}
        for key in self.tensors.keys():
            if not key.startswith(PREFIX):
                raise SurgeryError(f"{self.path}: tensor {key!r} is not a PEFT key (expected '{PREFIX}...')")
            rest = key[len(PREFIX):]
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.(weight|bias)", rest) or \
                re.fullmatch(r"(.+)\.(lora_embedding_A|lora_embedding_B|ia3_l)", rest)
            if m and "lora_magnitude_vector" not in rest:
                role = m[2]
                if m[2] == "lora_B" and m.group(3) == "bias":
                    role = "lora_bias"
                elif m[2] == "lora_A" and m.group(3) == "bias":
                    raise SurgeryError(f"{self.path}: unexpected tensor {key!r}")
                found.setdefault(m[1], {})[role] = key
            elif "lora_" in rest or "ia3_" in rest:
                raise SurgeryError(f"{self.path}: tensor {key!r} is not a plain LoRA/(IA)³ weight; not supported")
            else:  # saved whole; 'x.base_layer.weight' is the wrapped layer's own weight
                module, _, param = rest.replace(".base_layer.", ".").rpartition(".")
                found.setdefault(module, {})["full:" + param] = key
        return found

    def rank_alpha(self, module: str) -> tuple[int, float]:
        c = self.config
        r = _pattern(c.get("rank_pattern") or {}, module, c.get("r", 8))
        alpha = _pattern(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", 8))
        return int(r), float(alpha)

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    # ---- module -> base tensor ---------------------------------------------
    def resolve(self, base: Checkpoint) -> "PeftAdapter":
        """Map every adapter tensor to a base tensor and check ranks and shapes; fills ``terms``."""
        self.terms = {}
        fifo = bool(self.config.get("fan_in_fan_out"))
        meta = self.tensors.meta
        ignored = []
        for module, roles in self.modules().items():
            if not targeted(self.config, module) and any(not r.startswith("full:") for r in roles):
                # PEFT creates adapter layers only for target_modules and drops other saved tensors
                ignored.append(module)
                roles = {r: k for r, k in roles.items() if r.startswith("full:")}
            def target(param, raw_key):
                return _base_name(f"{module}.{param}", base, self.path, raw_key)

            def add(name, term):
                self.terms.setdefault(name, []).append(term)

            for role, key in roles.items():
                if role.startswith("full:"):
                    name = target(role[5:], key)
                    _check_same(meta[key].shape, base.meta[name].shape, key, name, self.path)
                    add(name, Term("replace", (key,), module))
            if self.peft_type == "LORA":
                emb = "lora_embedding_A" in roles or "lora_embedding_B" in roles
                a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
                if a_role not in roles and b_role not in roles:
                    if "ia3_l" in roles:
                        raise SurgeryError(f"{self.path}: (IA)³ tensor {roles['ia3_l']!r} in a LoRA adapter")
                    continue
                for want in (a_role, b_role):
                    if want not in roles:
                        raise SurgeryError(f"{self.path}: module {module!r} has no {want} tensor")
                a_key, b_key = roles[a_role], roles[b_role]
                name = target("weight", a_key)
                r, _ = self.rank_alpha(module)
                a, b = meta[a_key].shape, meta[b_key].shape
                if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
                    raise SurgeryError(f"{self.path}: rank mismatch for module {module!r}: {CONFIG_NAME} says r={r} "
                                       f"but {a_role} has shape {list(a)} and {b_role} {list(b)}")
                t_fifo = True if emb else fifo
                out = (a[1], b[0]) if t_fifo else (b[0], a[1])
                if out != tuple(base.meta[name].shape):
                    raise SurgeryError(f"{self.path}: shape mismatch for module {module!r}: B·A is {list(out)} "
                                       f"but base tensor {name!r} is {list(base.meta[name].shape)}")
                add(name, Term("lora", (a_key, b_key), module, self.scaling(module), t_fifo, r))
                if "lora_bias" in roles:
                    bname = target("bias", roles["lora_bias"])
                    add(bname, Term("lora_bias", (roles["lora_bias"],), module, self.scaling(module)))
            else:
                if "ia3_l" not in roles:
                    if any(k.startswith("lora") for k in roles):
                        raise SurgeryError(f"{self.path}: LoRA tensors in an (IA)³ adapter (module {module!r})")
                    continue
                key = roles["ia3_l"]
                name = target("weight", key)
                try:
                    ia3_shape([base.meta[name].shape, meta[key].shape], {"fan_in_fan_out": fifo})
                except SurgeryError as e:
                    raise SurgeryError(f"{self.path}: shape mismatch for module {module!r}: {e}") from None
                add(name, Term("ia3", (key,), module, fan_in_fan_out=fifo))
                # PEFT stores (out, 1) for attention-like modules, whose bias it scales too, and
                # (1, in) for feed-forward ones, whatever fan_in_fan_out says
                shape = tuple(meta[key].shape)
                bname = _find_name(f"{module}.bias", base)
                if bname and shape[1] == 1 and shape[0] == math.prod(base.meta[bname].shape):
                    add(bname, Term("ia3_bias", (key,), module))
        if ignored:
            import warnings

            warnings.warn(f"{self.path}: ignoring the tensors of {len(ignored)} module(s) not in target_modules, "
                          f"as PEFT does (first: {ignored[0]!r})", stacklevel=2)
        return self


def _pattern(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first key that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _find_name(name: str, base: Checkpoint) -> str | None:
    """The base tensor for a PEFT parameter name: as is, under 'model.', or without the first part."""
    for cand in (name, "model." + name, name.split(".", 1)[-1]):
        if cand in base.meta:
            return cand
    return None


def _base_name(name: str, base: Checkpoint, path: Path, raw_key: str) -> str:
    found = _find_name(name, base)
    if found is None:
        raise SurgeryError(f"{path}: adapter tensor {raw_key!r} targets {name!r}, which the base "
                           f"{base.ref!r} does not have (missing base module)")
    return found


def _check_same(a, b, key, name, path):
    if tuple(a) != tuple(b):
        raise SurgeryError(f"{path}: shape mismatch: {key!r} is {list(a)} but base tensor {name!r} is {list(b)}")


def ia3_shape(shapes, p):
    """Output shape of an (IA)³ scaling: the base shape, if the vector scales its rows or columns (or bias)."""
    w, l_ = shapes
    if p.get("bias"):
        if math.prod(l_) != math.prod(w):
            raise SurgeryError(f"(IA)³ vector {list(l_)} does not fit bias {list(w)}")
        return w
    lt = tuple(reversed(l_)) if p.get("fan_in_fan_out") else tuple(l_)
    if len(w) != 2 or len(lt) != 2 or lt not in ((w[0], 1), (1, w[1])):
        raise SurgeryError(f"(IA)³ vector {list(l_)} does not scale a row or column of {list(w)}")
    return w
