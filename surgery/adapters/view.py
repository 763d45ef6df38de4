"""PEFT adapters (LoRA, (IA)³) as recipe inputs: a base checkpoint plus the adapter's ΔW.

    base = Checkpoint.open("models/base")
    sw = open_adapter("adapters/lora_sw", base)      # reads like a merged checkpoint
    sw.keys(), sw.meta[name], sw.config, sw.root     # the base's names, shapes, dtypes, config
    w = sw.get("model.layers.0.self_attn.q_proj.weight")   # base + scaling·B·A, in the base's dtype
    sw.delta(name)                                   # float32 ΔW (zeros where the adapter is silent)

In a recipe an adapter is an input with its base:

    inputs:
      base: models/base
      sw:   {adapter: adapters/lora_sw, base: base}

Planners refer to ``sw`` like any checkpoint; ``build_plan`` then rewrites every ``Ref('sw', name)``
into an op tree over the base tensor and the adapter's raw tensors (``lora``, ``ia3`` ops below),
so ``surgery plan`` shows it and ``surgery run`` streams it like any other tensor. The raw adapter
file is a hidden input ``sw:adapter`` (it is hashed in the manifest); a base given as a path rather
than an input name is a hidden input ``sw:base``.

The merge follows PEFT exactly: LoRA ``W + transpose(B @ A, fan_in_fan_out) * scaling`` with
``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``; per module from ``rank_pattern`` and
``alpha_pattern``); embeddings ``W + (B @ A).T * scaling``; (IA)³ ``W * transpose(l, fan_in_fan_out)``
with ``l`` of shape (out, 1) for attention-like modules (rows; the bias is scaled too) and (1, in)
for feed-forward modules (columns). ``modules_to_save`` tensors replace the base's.
"""


from __future__ import annotations

from pathlib import Path

from surgery.adapters.peft import PeftAdapter, Term, ia3_shape
from surgery.core.plan import VirtualInput
from surgery.io.checkpoint import Checkpoint
from surgery.errors import SurgeryError, did_you_mean
from surgery.core.graph import OPS, Node, Op, Ref, evaluate, linear, register


# ---------------------------------------------------------------------------- tensor ops

def _transpose(t, yes: bool):
    return t.T if yes else t


def _lora_shape(shapes, p):
    w, a, b = shapes
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise SurgeryError(f"LoRA factors A {list(a)} and B {list(b)} don't share a rank")
    out = (a[1], b[0]) if p.get("fan_in_fan_out") else (b[0], a[1])
    if tuple(w) != out:
        raise SurgeryError(f"LoRA B·A has shape {list(out)} but the base tensor has {list(w)}")
    return w


def _lora(ts, p):
    w, a, b = ts
    return w + _transpose(b @ a, p.get("fan_in_fan_out", False)) * p["scaling"]


def _ia3(ts, p):
    w, l_ = ts
    if p.get("bias"):
        return w * l_.reshape(w.shape)
    return w * _transpose(l_, p.get("fan_in_fan_out", False))


def _same(shapes, p):
    if any(s != shapes[0] for s in shapes[1:]):
        raise SurgeryError(f"(IA)³ vectors {[list(s) for s in shapes]} differ in shape")
    return shapes[0]


def _ia3_adamergex(ts, p):
    task, tgt, src = ts
    return task * (p["t"] * (tgt / src - 1.0) + 1.0)


def _adamergex(ts, p):
    task, tgt, src = ts
    return task + p["t"] * (tgt - src)


def adamergex_combine(task, target_ref, source_ref, t: float, multiplicative: bool):
    """One AdaMergeX tensor from the three adapters' tensors, by the ops the recipe operation plans:
    task + t·(target_ref − source_ref), or for (IA)³ vectors task ⊙ (t·(target_ref / source_ref − 1) + 1)."""
    op = OPS["ia3_adamergex" if multiplicative else "adamergex"]
    return op.compute([task, target_ref, source_ref], {"t": t})


register("lora", Op(shape=_lora_shape, compute=_lora, describe=lambda a, p: f"{a[0]} {_w(p)}ΔW({p['label']})"))
register("ia3", Op(shape=ia3_shape, compute=_ia3, describe=lambda a, p: f"{a[0]} ⊙ l({p['label']})"))
register("adamergex", Op(shape=_same, compute=_adamergex, elementwise=True,
                         describe=lambda a, p: f"{a[0]} + {p['t']:.4g}·({a[1]} − {a[2]})"))
register("ia3_adamergex", Op(shape=_same, compute=_ia3_adamergex,
                             describe=lambda a, p: f"{a[0]}⊙({p['t']:.4g}·({a[1]}/{a[2]}−1)+1)"))


def _w(p) -> str:
    """'+ ', '− ', '+ 0.5·', '− 0.7·' for the weight on ΔW."""
    w = p.get("weight", 1.0)
    return ("− " if w < 0 else "+ ") + ("" if abs(w) == 1.0 else f"{abs(w):.4g}·")


# ---------------------------------------------------------------------------- trees

def apply_terms(terms: list[Term], under, raw_input: str, base_ref: Ref, label: str, weight: float = 1.0):
    """The op tree of one tensor after an adapter's terms act on ``under`` (a node or ref).

    ``weight`` scales ΔW (LoRA, replaced tensors); (IA)³ accepts only weight 1."""
    node = under
    for t in terms:
        raw = [Ref(raw_input, k, base_ref.layer, base_ref.out_layer) for k in t.keys]
        if weight != 1.0 and t.kind.startswith("ia3"):
            raise SurgeryError(f"adapter {label!r}: an (IA)³ adapter cannot be weighted (weight {weight}); "
                               "its scaling is multiplicative")
        if t.kind == "lora":
            node = Node("lora", [node] + raw, {"scaling": t.scaling * weight, "fan_in_fan_out": t.fan_in_fan_out,
                                               "label": label, "weight": weight})
        elif t.kind == "lora_bias":
            node = linear([(1.0, node), (t.scaling * weight, raw[0])])
        elif t.kind == "replace":
            # a saved-whole tensor replaces the base; on top of something else it adds its difference
            node = raw[0] if weight == 1.0 and node == base_ref else \
                linear([(1.0, node), (weight, raw[0]), (-weight, base_ref)])
        elif t.kind in ("ia3", "ia3_bias"):
            node = Node("ia3", [node, raw[0]], {"fan_in_fan_out": t.fan_in_fan_out, "bias": t.kind == "ia3_bias",
                                                "label": label})
    return node


class AdapterCheckpoint(VirtualInput):
    """A base checkpoint with an adapter applied, readable through Checkpoint's interface."""

    def __init__(self, name: str, adapter: PeftAdapter, base: Checkpoint, base_input: str, raw_input: str):
        self.name, self.adapter, self.base = name, adapter, base
        self.base_input, self.raw_input = base_input, raw_input
        self.ref = adapter.tensors.ref
        self.revision = None
        self._readers = {base_input: base, raw_input: adapter.tensors}

    # Checkpoint's interface: the base's names, shapes, dtypes and config
    @property
    def root(self) -> Path:
        return self.base.root

    @property
    def meta(self):
        return self.base.meta

    @property
    def config(self) -> dict:
        return self.base.config

    @property
    def peft_type(self) -> str:
        return self.adapter.peft_type

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    @property
    def files(self) -> list[Path]:
        return []   # the hidden inputs (adapter file, base) carry the hashes

    def file_hashes(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        self.base.close()
        self.adapter.tensors.close()

    # trees
    def touched(self, name: str) -> bool:
        return name in self.adapter.terms

    def tree(self, name: str, under=None, weight: float = 1.0, ref: Ref | None = None):
        """Op tree for tensor ``name`` with this adapter applied on ``under`` (default: the base tensor)."""
        base_ref = Ref(self.base_input, name, ref.layer if ref else None, ref.out_layer if ref else None)
        under = base_ref if under is None else under
        return apply_terms(self.adapter.terms.get(name, []), under, self.raw_input, base_ref, self.name, weight)

    def expand(self, ref: Ref):
        """What build_plan calls for every Ref to this input."""
        return self.tree(ref.name, ref=ref)

    def _read(self, ref: Ref):
        return self._readers[ref.input].get(ref.name)

    def get_float(self, name: str):
        """The merged tensor in float32 (no rounding to the base's dtype)."""
        if name not in self.base:
            raise KeyError(name)
        return evaluate(self.tree(name), self._read).float()

    def get(self, name: str):
        """The merged tensor in the base's dtype, as a merged checkpoint would store it."""
        from surgery.io.safetensors import torch_dtype

        return self.get_float(name).to(torch_dtype(self.meta[name].dtype))

    def delta(self, name: str):
        """float32 ΔW = merged − base (zeros for tensors the adapter does not touch)."""
        return self.get_float(name) - self.base.get(name).float()


def open_adapter(path, base: Checkpoint | str, *, name: str = "adapter", base_dir: Path | None = None
                 ) -> AdapterCheckpoint:
    """Open an adapter directory on a base (a Checkpoint or anything Checkpoint.open takes)."""
    if not isinstance(base, Checkpoint):
        base = Checkpoint.open(base, base_dir=base_dir)
    adapter = PeftAdapter.open(path, base_dir).resolve(base)
    return AdapterCheckpoint(name, adapter, base, f"{name}:base", f"{name}:adapter")


def open_adapter_input(name: str, spec, opened: dict, *, base_dir: Path | None = None,
                       convert_bin: bool = False) -> dict:
    """The inputs one recipe adapter entry adds: the view ``name`` and its hidden raw inputs."""
    out = {}
    if spec.base in opened:
        base, base_input = opened[spec.base], spec.base
        if isinstance(base, AdapterCheckpoint):
            raise SurgeryError(f"base {spec.base!r} is itself an adapter; stack adapters with the "
                               "apply_adapters operation instead")
    else:
        base_input = f"{name}:base"
        try:
            base = out[base_input] = Checkpoint.open(spec.base, convert_bin=convert_bin, base_dir=base_dir)
        except SurgeryError as e:
            raise SurgeryError(f"base {spec.base!r} is not an input name, and as a path: {e}"
                               + did_you_mean(spec.base, [n for n in opened if ":" not in n], what="input")) from None
    adapter = PeftAdapter.open(spec.adapter, base_dir).resolve(base)
    raw_input = f"{name}:adapter"
    out[raw_input] = adapter.tensors
    out[name] = AdapterCheckpoint(name, adapter, base, base_input, raw_input)
    return out
