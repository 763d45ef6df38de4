"""Small parsers behind recipe fields: sizes ('2GB'), layer specs ('0-3, -1') and linear expressions."""

from __future__ import annotations

import ast
import re
from typing import Union

LayerSpec = Union[int, str, list[Union[int, str]]]


def parse_size(value: int | str) -> int:
    """'2GB' -> 2_000_000_000; also KB, MB, GB, TB, KiB, MiB, GiB and plain integers."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("shard size must be positive")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value, re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size like 500MB or 2GB, got {value!r}")
    unit = (m[2] or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m[1]) * mult)
    if size <= 0:
        raise ValueError("shard size must be positive")
    return size


def parse_layers(spec: LayerSpec, n_layers: int) -> list[int]:
    """'0-3, 28-31' / 5 / [0, -1, '4-6'] -> sorted-as-written unique indices within [0, n_layers)."""
    items = spec if isinstance(spec, list) else [spec]
    out: list[int] = []
    for item in items:
        parts = [item] if isinstance(item, int) else [p for p in str(item).replace(" ", "").split(",") if p]
        for p in parts:
            if isinstance(p, int) or re.fullmatch(r"-?\d+", p):
                idx = [int(p)]
            else:
                m = re.fullmatch(r"(-?\d+)(?:-|\.\.|:)(-?\d+)", p)
                if not m:
                    raise ValueError(f"expected a layer index or range like '4-7', got {p!r}")
                a, b = int(m[1]), int(m[2])
                a, b = (a + n_layers if a < 0 else a), (b + n_layers if b < 0 else b)
                if a > b:
                    raise ValueError(f"empty layer range {p!r}")
                idx = list(range(a, b + 1))
            for i in idx:
                j = i + n_layers if i < 0 else i
                if not 0 <= j < n_layers:
                    raise ValueError(f"layer {i} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
                if j not in out:
                    out.append(j)
    return out


def parse_expression(expr: str) -> dict[str, float]:
    """'math + 1.0*(sw - en)' -> {'math': 1.0, 'sw': 1.0, 'en': -1.0}. Only linear forms."""
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse expression {expr!r}: {e.msg}") from None

    def walk(node) -> dict[str, float]:  # returns coefficients; key '' is a plain number
        if isinstance(node, ast.Name):
            return {node.id: 1.0}
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return {"": float(node.value)}
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return {k: sign * v for k, v in walk(node.operand).items()}
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, (ast.Add, ast.Sub)):
                s = 1.0 if isinstance(node.op, ast.Add) else -1.0
                out = dict(a)
                for k, v in b.items():
                    out[k] = out.get(k, 0.0) + s * v
                return out
            if isinstance(node.op, ast.Mult):
                if set(a) == {""}:
                    return {k: a[""] * v for k, v in b.items()}
                if set(b) == {""}:
                    return {k: b[""] * v for k, v in a.items()}
                raise ValueError(f"{expr!r}: two checkpoints multiplied; only scalar * checkpoint is linear")
            if isinstance(node.op, ast.Div) and set(b) == {""}:
                if b[""] == 0:
                    raise ValueError(f"{expr!r}: division by zero")
                return {k: v / b[""] for k, v in a.items()}
            raise ValueError(f"{expr!r}: only +, -, scalar * and / by a number are allowed")
        raise ValueError(f"{expr!r}: unsupported syntax {ast.unparse(node)!r}")

    coeffs = walk(tree)
    if coeffs.get("", 0.0) != 0.0:
        raise ValueError(f"{expr!r}: a bare number is added to a checkpoint; multiply it instead")
    coeffs.pop("", None)
    if not coeffs:
        raise ValueError(f"{expr!r} names no input")
    # round away float residue such as 1 - 0.7 - 0.3 = 5.6e-17
    coeffs = {k: round(v, 12) for k, v in coeffs.items()}
    return {k: v for k, v in coeffs.items() if v != 0.0}
