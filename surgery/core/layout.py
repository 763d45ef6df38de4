"""Tensor name -> (layer index, module kind, neuron axis).

    layout = Layout.for_checkpoint(ckpt)
    info = layout.info("model.layers.3.mlp.down_proj.weight")
    info.layer, info.kind, info.group, info.neuron_axis   # 3, 'mlp_down', 'mlp', 1

All architecture knowledge lives in ``_data/layout.json`` and in mergekit's architecture
JSON files (read as data; mergekit is not imported). Unknown architectures fall back to a
generic ``.N.`` rule, with a warning.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from surgery.core.experts import expert_of, is_stacked

MODULE_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp_gate", "mlp_up", "mlp_down",
                "mlp_gate_up", "mlp_router", "mlp_act", "norm", "final_norm", "embed", "lm_head", "other")
MODULE_GROUPS = ("attn", "mlp", "norm", "embed", "lm_head", "other")


@functools.lru_cache(maxsize=None)
def layout_data() -> dict:
    data = json.loads((Path(__file__).parents[1] / "_data" / "layout.json").read_text())
    data["layer_rules"] = [(re.compile(p), k) for p, k in data["layer_rules"]]
    data["global_rules"] = [(re.compile(p), k) for p, k in data["global_rules"]]
    data["no_lora"] = [re.compile(p) for p in data["no_lora"]["patterns"]]
    data["no_neurons"] = [re.compile(p) for p in data["no_neurons"]["patterns"]]
    return data


@functools.lru_cache(maxsize=None)
def _mergekit_architectures() -> dict[str, tuple[str, str]]:
    """architecture class name -> (layer prefix, num-layers config key), from mergekit's data files."""
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0]) / "_data" / "architectures"
    found = {}
    for f in sorted(folder.glob("*.json")):
        try:
            d = json.loads(f.read_text())
            first = d["layer_templates"]["weights"][0]["name"]
        except (ValueError, KeyError, IndexError):
            continue
        prefix = first.split("${layer_index}")[0]
        for arch in d.get("architectures", []):
            found.setdefault(arch, (prefix, d.get("num_layers_config_key", "num_hidden_layers")))
    return found


@dataclass(frozen=True)
class Heads:
    """The attention head layout of a model (``Layout.heads``)."""

    n_heads: int
    head_dim: int
    kv_groups: bool  # fused qkv rows stored per key/value head as [q × heads per group, k, v]

    def kv_heads(self, kind: str, rows: int) -> int | None:
        """Key/value heads implied by ``rows`` rows of an attn_k, attn_v or attn_qkv tensor (None: no whole number
        that divides the query heads), so multi-query and grouped-query attention need no config key."""
        if rows % self.head_dim:
            return None
        n = rows // self.head_dim
        if kind == "attn_qkv":
            n = (n - self.n_heads) // 2 if (n - self.n_heads) % 2 == 0 else 0
        return n if n > 0 and self.n_heads % n == 0 else None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    layer: int | None       # transformer block index, None for embeddings/final norm/lm_head
    kind: str               # one of MODULE_KINDS
    group: str              # one of MODULE_GROUPS
    neuron_axis: int | None  # axis indexing MLP intermediate neurons, for mlp_gate/up/down tensors
    suffix: str             # the name after the layer prefix (whole name when layer is None)
    expert: int | None = None     # the expert of a per-expert MoE tensor (core.experts)
    stacked_experts: bool = False  # a tensor holding every expert of its layer along axis 0


class Layout:
    """Classifies the tensor names of one architecture."""

    def __init__(self, prefix: str | None, model_type: str = "", transposed: bool = False,
                 num_layers_key: str = "num_hidden_layers"):
        self.prefix = prefix
        self.model_type = model_type
        self.transposed = transposed
        self.num_layers_key = num_layers_key
        if prefix is None:
            self._layer_re = re.compile(r"^(?P<pre>.*?\.)(?P<idx>\d+)\.(?P<rest>.+)$")
        else:
            self._layer_re = re.compile("^(?P<pre>" + re.escape(prefix) + r")(?P<idx>\d+)\.(?P<rest>.+)$")

    @classmethod
    def for_checkpoint(cls, ckpt) -> "Layout":
        return cls.detect(ckpt.config, ckpt.keys(), source=ckpt.ref)

    @classmethod
    def detect(cls, config: dict, names: list[str], source: str = "") -> "Layout":
        data = layout_data()
        model_type = config.get("model_type", "")
        candidates: list[str] = []
        num_key = next((k for k in data["num_layers_keys"] if k in config), "num_hidden_layers")
        for arch in config.get("architectures") or []:
            if arch in _mergekit_architectures():
                prefix, key = _mergekit_architectures()[arch]
                candidates.append(prefix)
                if key in config:
                    num_key = key
        candidates += data["layer_prefixes"].get(model_type, [])
        known = bool(candidates)
        candidates += data["layer_prefixes"]["*"]
        transposed = model_type in data["transposed_linear"]
        for prefix in candidates:
            pat = re.compile("^" + re.escape(prefix) + r"\d+\.")
            if any(pat.match(n) for n in names):
                if not known:
                    warnings.warn(f"{source or 'checkpoint'}: architecture {model_type or '(no config)'!r} "
                                  f"is not in the layout tables; using layer prefix {prefix!r}", stacklevel=2)
                return cls(prefix, model_type, transposed, num_key)
        if any(re.search(r"\.\d+\.", n) for n in names):
            warnings.warn(f"{source or 'checkpoint'}: unknown architecture {model_type or '(no config)'!r}; "
                          "using the generic '.N.' rule for layer indices", stacklevel=2)
        return cls(None, model_type, transposed, num_key)

    @functools.lru_cache(maxsize=None)
    def info(self, name: str) -> TensorInfo:
        data = layout_data()
        m = self._layer_re.match(name)
        if m:
            layer, rest, rules = int(m["idx"]), m["rest"], data["layer_rules"]
        else:
            layer, rest, rules = None, name, data["global_rules"]
        kind = next((k for pat, k in rules if pat.search(rest)), "other")
        return TensorInfo(name, layer, kind, data["groups"][kind], self._neuron_axis(kind, rest), rest,
                          expert_of(name), is_stacked(name))

    def _neuron_axis(self, kind: str, rest: str) -> int | None:
        if kind not in ("mlp_gate", "mlp_up", "mlp_down", "mlp_gate_up"):
            return None
        if any(p.search(rest) for p in layout_data()["no_neurons"]):
            return None  # e.g. an MoE shared expert: an MLP of its own width
        is_bias = rest.endswith("bias")
        if kind == "mlp_down":
            return None if is_bias else (0 if self.transposed else 1)
        return 0 if is_bias else (1 if self.transposed else 0)

    def heads(self, config: dict) -> tuple[Heads | None, str]:
        """The head layout from the config (``text_config`` when nested), or None and the reason."""
        att = layout_data()["attention"]
        cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        first = lambda keys: next((cfg[k] for k in keys if cfg.get(k)), None)  # noqa: E731
        nh, hidden, hd = first(att["heads_keys"]), first(att["hidden_keys"]), first(att["head_dim_keys"])
        if not nh:
            return None, f"the config has no {' or '.join(att['heads_keys'])}"
        hd = hd or (hidden // nh if hidden and hidden % nh == 0 else None)
        if not hd:
            return None, f"cannot derive head_dim from the config (heads {nh}, hidden size {hidden})"
        return Heads(nh, hd, self.model_type in att["qkv_kv_groups"]), ""

    def lora_target(self, name: str) -> bool:
        """Whether PEFT can put a LoRA on this weight's module (not an MoE expert or router)."""
        return not any(p.search(name) for p in layout_data()["no_lora"])

    def layer_name(self, name: str, new_layer: int) -> str:
        """The same tensor name at another layer index."""
        m = self._layer_re.match(name)
        if not m:
            return name
        return f"{m['pre']}{new_layer}.{m['rest']}"

    def num_layers(self, names, config: dict | None = None) -> int:
        """Layer count: from the tensor names, which must agree with the config when it has one."""
        layers = {i.layer for i in map(self.info, names) if i.layer is not None}
        return max(layers) + 1 if layers else int((config or {}).get(self.num_layers_key, 0))
