"""Real text in several languages from the system's gettext catalogs, split for the experiment.

The catalogs pair every English msgid with its human translation. One seeded shuffle of the English-German
pairs gives disjoint parts: held-out pairs for perplexity (the same strings in both languages), pairs for the
activation probe, and the rest: the German side is the language expert's training text. French and Spanish
(third and fourth languages for the LAPE neuron check) give held-out and probe texts the same way.

The files come from `surgery data mo` (run by the experiment).
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def read_pairs(data_dir, lang: str) -> list[tuple[str, str]]:
    with open(Path(data_dir) / f"en-{lang}.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [(r["en"], r[lang]) for r in rows]


def split_texts(data_dir, lang: str, others: list[str], *, n_eval: int, n_probe: int, seed: int) -> dict:
    """Disjoint parts of the catalogs, after one seeded shuffle per language:

    ``eval``: {"en": [...], lang: [...], *others} held-out strings for perplexity (en and lang parallel);
    ``probe``: {"en", lang, *others: [...]} strings for the activation probe (``n_probe`` each);
    ``parallel``: [(en, lang)] probe pairs, for the alignment analysis;
    ``train``: the remaining strings in ``lang`` (the language expert's training text);
    ``train_en``: their English originals (the English expert's training text, for AdaMergeX).
    """
    pairs = read_pairs(data_dir, lang)
    random.Random(seed).shuffle(pairs)
    held, probe, train = pairs[:n_eval], pairs[n_eval:n_eval + n_probe], pairs[n_eval + n_probe:]
    out = {"eval": {"en": [e for e, _ in held], lang: [t for _, t in held]},
           "probe": {"en": [e for e, _ in probe], lang: [t for _, t in probe]},
           "parallel": probe, "train": [t for _, t in train], "train_en": [e for e, _ in train]}
    for other in others:
        other_pairs = read_pairs(data_dir, other)
        random.Random(seed).shuffle(other_pairs)
        out["eval"][other] = [t for _, t in other_pairs[:n_eval]]
        out["probe"][other] = [t for _, t in other_pairs[n_eval:n_eval + n_probe]]
    return out
