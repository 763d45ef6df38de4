"""`surgery.probe`: run models forward over texts and measure where they process each language.

    import surgery
    r = surgery.probe("base/", texts={"en": "data/en.txt", "de": "data/de.txt", "fr": "data/fr.txt"},
                      parallel=["data/en-de.jsonl"])
    r.models["base"].probing.accuracy          # [per layer]
    r.models["base"].alignment["en-de"]        # [Alignment per layer]
    surgery.save_neuron_set("lape/de.json", r.neurons("de"))
    r.to_json(); r.to_csv("probe.csv"); r.plot("probe.png")

A model is a checkpoint (folder, .safetensors file, Hub id), a recipe (its output built in memory, bitwise
what `surgery run` writes: ``surgery.models.load_model``) or a model object; each runs for inference only
(eval mode, torch.no_grad), one at a time.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError
from surgery.io.reference import resolve_reference
from surgery.probing.hooks import find_points, require_mlp
from surgery.probing.inputs import load_data
from surgery.probing.lape import LapeSettings, select
from surgery.probing.layerwise import alignment as align
from surgery.probing.layerwise import chance, probe_accuracy, require_sklearn
from surgery.probing.result import ModelProbe, ProbeResult, Probing

DTYPES = ("float32", "bfloat16", "float16")


def _named(models) -> dict:
    if isinstance(models, dict):  # values: references (paths, Hub ids, recipe files), recipes, or models in memory
        return {str(k): str(v) if isinstance(v, Path) else v for k, v in models.items()}
    if isinstance(models, (str, Path)):
        models = [models]
    named = {}
    for m in models:
        name, sep, ref = str(m).partition("=")
        if not sep:
            name, ref = Path(str(m).rstrip("/")).name or str(m), str(m)
        if not name or not ref:
            raise SurgeryError(f"model {m!r}: expected PATH or NAME=PATH")
        if name in named:
            raise SurgeryError(f"two models are named {name!r}; name them with NAME=PATH")
        named[name] = ref
    if not named:
        raise SurgeryError("no model given")
    return named


def _load(ref, tokenizer, dtype: str, device: str, progress: bool):
    """(tokenizer, model in eval mode): a model in memory as it is, anything else through ``load_model`` (a
    checkpoint, a Hub id, a recipe's output built in memory)."""
    import torch

    from surgery.models import load_model, load_tokenizer

    if dtype not in DTYPES:
        raise SurgeryError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(ref, torch.nn.Module):
        if tokenizer is None:
            raise SurgeryError("a model given as an object needs a tokenizer (tokenizer=...)")
        return load_tokenizer(tokenizer), ref.eval()
    model, tok = load_model(ref, device=device, dtype=dtype, tokenizer=tokenizer, progress=progress, encoder=True)
    return tok, model


@dataclass
class _Job:
    """The texts of one call, laid out once for every model: rows of ``items`` by role."""

    items: list[str]
    item_lang: np.ndarray                  # language index of each item for LAPE, -1 if none
    rows: dict                             # role -> item indices: ("text", lang), ("labels",), ("par", n, side)
    langs: list[str]
    pairs: list[str]                       # alignment keys, one per parallel file ("en-de")
    probe_rows: np.ndarray
    probe_labels: list[str]
    lape: bool
    probing: bool
    alignment: bool
    settings: LapeSettings
    opts: dict                             # tokenizer, dtype, device, batch_size, max_tokens, folds, seed, progress


def _job(data, lape, probing, alignment, settings, opts) -> _Job:
    items, item_lang, rows = [], [], {}

    def add(key, texts, lang=-1):
        rows[key] = np.arange(len(items), len(items) + len(texts))
        items.extend(texts)
        item_lang.extend([lang] * len(texts))

    langs = list(data.texts)
    for k, lang in enumerate(langs):
        add(("text", lang), data.texts[lang], k)
    if data.labelled:
        add(("labels",), [t for t, _ in data.labelled])
    pairs = []
    for n, par in enumerate(data.parallel):
        add(("par", n, 0), [a for a, _ in par.sentences])
        add(("par", n, 1), [b for _, b in par.sentences])
        key = f"{par.pair[0]}-{par.pair[1]}"
        pairs.append(key if key not in pairs else f"{key}#{n + 1}")
    if data.labelled:
        probe_rows, probe_labels = rows[("labels",)], [lab for _, lab in data.labelled]
    else:
        probe_rows = np.concatenate([rows[("text", lang)] for lang in langs]) if langs else np.zeros(0, int)
        probe_labels = [lang for lang in langs for _ in data.texts[lang]]
    do_probing = probing and len(set(probe_labels)) >= 2
    if do_probing and min(np.unique(probe_labels, return_counts=True)[1]) < 2:
        raise SurgeryError("probing needs at least two texts per label")
    if do_probing:
        require_sklearn()
    return _Job(items, np.asarray(item_lang), rows, langs, pairs, probe_rows, probe_labels, lape and len(langs) >= 2,
                do_probing, alignment and bool(pairs), settings, opts)


def probe(models, texts=None, *, labels=None, parallel=None, lape: bool = True, probing: bool = True,
          alignment: bool = True, device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
          max_tokens: int = 128, tokenizer=None, folds: int = 5, seed: int = 0,
          lape_settings: LapeSettings | None = None, limit: int | None = None,
          progress: bool | None = None) -> ProbeResult:
    """Probe one or more models: a reference (a checkpoint folder or file, a Hub id, a recipe file), a list of
    them or of NAME=REF, or {name: reference, Recipe, recipe dict, Plan or model object}.

    texts: {language: text file or list of texts}: LAPE neurons, and the probing labels unless
    ``labels`` (a JSONL file of {text, label}) is given. parallel: JSONL files of translation pairs.
    A model object (a transformers model already in memory, e.g. built from a plan) is used as it
    is, on its own device and dtype; give its ``tokenizer`` (an object or a path). ``progress``: bars on or
    off (None: only for a person at a terminal, ``surgery.io.progress``).
    """
    from surgery.io.progress import bars_on

    progress = bars_on(progress)
    if batch_size < 1 or max_tokens < 1:
        raise SurgeryError("--batch-size and --max-tokens must be at least 1")
    named = _named(models)
    for ref in named.values():  # every reference checked before any model runs
        if isinstance(ref, str):
            resolve_reference(ref)
    data = load_data(texts, labels, parallel, limit)
    settings = lape_settings or LapeSettings()
    job = _job(data, lape, probing, alignment, settings,
               dict(tokenizer=tokenizer, dtype=dtype, device=device, batch_size=batch_size, max_tokens=max_tokens,
                    folds=folds, seed=seed, progress=progress))
    result = ProbeResult(
        settings={"device": device, "dtype": dtype, "batch_size": batch_size, "max_tokens": max_tokens,
                  "folds": folds, "seed": seed, "lape": settings.__dict__ if job.lape else None},
        data={"texts": {lang: {"file": data.sources[lang], "count": len(ts)} for lang, ts in data.texts.items()},
              "labels": {"file": data.labels_file, "count": len(data.labelled)} if data.labelled else None,
              "parallel": [{"file": p.file, "pair": list(p.pair), "count": len(p.sentences)} for p in data.parallel]})
    for name, path in named.items():
        result.models[name] = _probe_model(name, path, job)
    return result


def _probe_model(name: str, path, job: _Job) -> ModelProbe:
    from tqdm.auto import tqdm

    from surgery.probing.forward import FeatureStore, run_forward

    o = job.opts
    start = time.perf_counter()
    tok, model = _load(path, o["tokenizer"], o["dtype"], o["device"], o["progress"])
    path = path if isinstance(path, str) else getattr(path, "source", None) or f"(in memory: {type(path).__name__})"
    points = find_points(model, source=path)
    if job.lape:
        require_mlp(points, path, model.config.model_type)
    ids = tok(job.items, truncation=True, max_length=o["max_tokens"])["input_ids"]
    if any(len(x) == 0 for x in ids):
        bad = next(i for i, x in enumerate(ids) if not x)
        raise SurgeryError(f"{path}: the tokenizer gives no tokens for text {job.items[bad][:40]!r}")
    pad = next((p for p in (tok.pad_token_id, tok.eos_token_id) if p is not None), 0)
    layers = [i for i, _ in points.layers]
    acc, std, aligned = [], [], {key: [] for key in job.pairs} if job.alignment else {}
    with tempfile.TemporaryDirectory(prefix="surgery-probe-") as tmp:
        store = FeatureStore(Path(tmp) / "pooled.f32", len(layers), len(job.items))
        bar = tqdm(total=sum(map(len, ids)), unit="tok", desc=f"probe {name}", disable=not o["progress"], leave=False)
        try:
            t0 = time.perf_counter()
            counts, tokens, order = run_forward(model, points, ids, job.item_lang, len(job.langs), store,
                                                o["batch_size"], next(model.parameters()).device, pad, job.lape, bar)
            forward_s = time.perf_counter() - t0
            bar.close()
            inv = np.argsort(order)  # item -> store row
            for n_layer in tqdm(range(len(layers)), desc=f"analyse {name}", disable=not o["progress"], leave=False):
                feats = store.layer(n_layer)
                if job.probing:
                    a, s = probe_accuracy(feats[inv[job.probe_rows]], job.probe_labels, o["folds"], o["seed"])
                    acc.append(a)
                    std.append(s)
                for n, key in enumerate(aligned):
                    aligned[key].append(align(feats[inv[job.rows[("par", n, 0)]]], feats[inv[job.rows[("par", n, 1)]]]))
        finally:
            store.close()
            bar.close()
    lape = None
    if job.lape:
        probs = np.stack([(counts[i] / np.maximum(tokens, 1)[:, None]).T for i in layers])
        lape = select(probs, job.langs, layers, dict(zip(job.langs, tokens.tolist())), job.settings)
    probing = Probing(sorted(set(job.probe_labels)), acc, std, chance(job.probe_labels)) if job.probing else None
    return ModelProbe(name, path, layers, int(sum(map(len, ids))), forward_s, time.perf_counter() - start, lape,
                      probing, aligned)
