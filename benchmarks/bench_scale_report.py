"""bench_scale.py's output hashes and its markdown table (medians over repeats of the recorded runs)."""

from __future__ import annotations

import hashlib
import json
import statistics
import struct
from pathlib import Path

TOOLS = ("surgery", "mergekit", "cat", "cp")


def _hash(f, dtype: str, shape: list[int], start: int, end: int) -> str:
    h = hashlib.sha1(f"{dtype}{shape}".encode())
    f.seek(start)
    while end > start:
        block = f.read(min(end - start, 64 << 20))
        h.update(block)
        start += len(block)
    return h.hexdigest()[:16]


def _parts(name: str, shape: list[int]) -> list[tuple[str, list[int], int, int]]:
    """Fused experts as transformers 5 (and mergekit 0.1.5) write them, cut into the per-expert tensors the
    inputs hold (gate_up_proj [E, 2I, H] = gate_proj rows then up_proj rows; down_proj [E, H, I]), so that
    outputs in either layout compare: (name, shape, first and last entry)."""
    prefix, fused = name.rsplit(".", 1)[0], name.rsplit(".", 1)[-1]
    if not prefix.endswith(".experts") or fused not in ("gate_up_proj", "down_proj") or len(shape) != 3:
        return [(name, shape, 0, None)]
    e, rows, cols = shape
    cut = {"gate_up_proj": [("gate_proj", 0, rows // 2), ("up_proj", rows // 2, rows)],
           "down_proj": [("down_proj", 0, rows)]}
    return [(f"{prefix}.{k}.{proj}.weight", [hi - lo, cols], (k * rows + lo) * cols, (k * rows + hi) * cols)
            for k in range(e) for proj, lo, hi in cut[fused]]


def digest(folder: Path) -> dict[str, str]:
    """tensor name -> sha1 of its dtype, shape and stored bytes, over every .safetensors file in folder."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            meta = json.loads(f.read(n))
            meta.pop("__metadata__", None)
            for name, m in sorted(meta.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = m["data_offsets"]
                size = 2 if m["dtype"] in ("BF16", "F16") else 4 if m["dtype"] == "F32" else None
                for part, shape, lo, hi in _parts(name, m["shape"]) if size else [(name, m["shape"], 0, None)]:
                    a = 8 + n + start + lo * (size or 1)
                    out[part] = _hash(f, m["dtype"], shape, a, 8 + n + end if hi is None else 8 + n + start + hi * size)
    return out


def same_output(x: dict[str, str] | None, y: dict[str, str] | None) -> str:
    if not x or not y:
        return "n/a"
    if set(x) != set(y):
        return f"different names ({len(set(x) ^ set(y))} of {len(set(x) | set(y))})"
    differ = sum(x[k] != y[k] for k in x)
    return "bitwise equal" if not differ else f"{differ} of {len(x)} tensors differ"


def check(job: str, runs: dict, not_compared: dict, no_mergekit_run: dict) -> str:
    """The output column: surgery's hashes against mergekit's (of the job it is compared with)."""
    s = next((r for r in runs.get((job, "surgery"), []) if r.get("digest")), None)
    peer = no_mergekit_run.get(job, job)
    if peer is None:
        return "n/a (no mergekit job)"
    failed = [r for r in runs.get((peer, "mergekit"), []) if r["code"]]
    if failed:
        return "mergekit failed: " + failed[0]["status"]
    m = next((r for r in runs.get((peer, "mergekit"), []) if r.get("digest")), None)
    text = same_output(s and s["digest"], m and m["digest"])
    if job in not_compared:
        return f"n/a ({not_compared[job]})" if text == "n/a" else f"{text} ({not_compared[job]})"
    return text + (f" (vs mergekit's {peer})" if peer != job and text != "n/a" else "")


def print_table(records: list[dict], not_compared: dict, no_mergekit_run: dict, title: str = "") -> None:
    runs: dict = {}
    for r in records:
        if r.get("kind") == "run":
            runs.setdefault((r["job"], r["tool"]), []).append(r)
    for r in records:
        if r.get("kind") in ("generate", "hash", "disk"):
            print(f"<!-- {r['kind']}: " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in r.items() if k != "kind") + " -->")
    jobs = list(dict.fromkeys(r["job"] for r in records if r.get("kind") == "run"))
    if title:
        print(f"\n{title}")
    print("\n| job | surgery wall s | surgery CPU s | surgery RSS GB | surgery read GB | surgery written GB | "
          "mergekit wall s | mergekit CPU s | mergekit RSS GB | mergekit read GB | mergekit written GB | "
          "mk/surgery wall | mk/surgery CPU | cat wall s | cat read GB | cp -r wall s | surgery/cat wall | "
          "surgery/cp wall | output | load (1 min) |")
    print("|---|" + "---:|" * 17 + "---|---|")
    for job in jobs:
        med, loads = {}, []
        for tool in TOOLS:
            ok = [r for r in runs.get((job, tool), []) if not r["code"]]
            loads += [x for r in runs.get((job, tool), []) for x in r["load"]]
            if ok:
                med[tool] = {k: statistics.median(r[k] for r in ok)
                             for k in ("wall", "cpu", "rss", "read_bytes", "write_bytes")}
        cells = [job]
        for tool in ("surgery", "mergekit"):
            m = med.get(tool)
            failed = tool not in med and runs.get((job, tool))
            cells += ([f"{m['wall']:.1f}", f"{m['cpu']:.1f}", f"{m['rss'] / 2**30:.2f}", f"{m['read_bytes'] / 1e9:.1f}",
                       f"{m['write_bytes'] / 1e9:.1f}"] if m else ["failed" if failed else ""] + [""] * 4)
        s, m, c, p = (med.get(t) for t in TOOLS)
        cells += [f"{m['wall'] / s['wall']:.2f}x" if s and m else "", f"{m['cpu'] / s['cpu']:.2f}x" if s and m else ""]
        cells += [f"{c['wall']:.1f}" if c else "", f"{c['read_bytes'] / 1e9:.1f}" if c else "",
                  f"{p['wall']:.1f}" if p else ""]
        cells += [f"{s['wall'] / c['wall']:.2f}x" if s and c else "",
                  f"{s['wall'] / p['wall']:.2f}x" if s and p else ""]
        cells += [check(job, runs, not_compared, no_mergekit_run),
                  f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""]
        print("| " + " | ".join(cells) + " |")
    print(flush=True)
