"""Tiny causal LMs with a byte-level tokenizer, and data files, for the `surgery eval` tests."""

from __future__ import annotations

import gettext
import glob
import json
import re
from pathlib import Path

import torch

from helpers import random_state, save_checkpoint, tiny_config

TEXTS = ["Habari ya asubuhi, rafiki yangu.", "Watoto wanacheza mpira uwanjani leo.",
         "Grüße aus Köln — ein kurzer Satz mit Umlauten.", "The quick brown fox jumps over the lazy dog."]
CHOICES = [
    {"prompt": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
    {"prompt": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"prompt": "Water is", "choices": ["dry", "wet", "a rock"], "label": 1},
    {"prompt": "Fire is", "choices": ["hot", "cold"], "label": 0},
    {"prompt": "Ice is", "choices": ["warm", "cold", "loud"], "label": 1},
    {"prompt": "Cats say", "choices": ["meow", "moo"], "label": 0},
]
GENERATION = [{"prompt": "Q: 2+3? A:", "answer": 5}, {"prompt": "Capital of France:", "answer": "Paris"},
              {"prompt": "Count: 1 2 3", "answer": "4"}]


def tiny_lm(path: Path, seed: int = 0, tie: bool = False, dtype=torch.float32) -> Path:
    """A random 4-layer llama (vocab 259 = the byte tokenizer's) with a tokenizer, saved at ``path``."""
    from surgery.demo import save_byte_tokenizer

    cfg = tiny_config("llama", vocab_size=259, num_hidden_layers=4, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    state = random_state(cfg, seed=seed)
    if tie:
        state.pop("lm_head.weight", None)
    save_checkpoint(path, state, cfg, dtype=dtype)
    save_byte_tokenizer(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n")
    return path


def english_msgids(n: int, locale: str = "de") -> list[str]:
    """Up to ``n`` real English sentences: msgids of the system's gettext catalogs for ``locale``
    (plain words only, 5+ words), sorted and deduplicated."""
    found = set()
    for path in sorted(glob.glob(f"/usr/share/locale/{locale}/LC_MESSAGES/*.mo")):
        try:
            with open(path, "rb") as fh:
                catalog = gettext.GNUTranslations(fh)._catalog
        except (OSError, ValueError):  # unreadable, or not UTF-8
            continue
        found.update(k for k in catalog if isinstance(k, str) and 30 <= len(k) <= 120 and len(k.split()) >= 5
                     and re.fullmatch(r"[A-Z][a-z]+( [a-z]+[,.]?)+", k))
    return sorted(found)[:n]


def write_mc_task(folder: Path, data_file: Path, metrics=("acc", "acc_norm")) -> Path:
    """A local lm-evaluation-harness multiple-choice task 'local_mc' over a JSONL of {prompt, choices, label}."""
    folder.mkdir(parents=True, exist_ok=True)
    listed = "".join(f"  - metric: {m}\n" for m in metrics)
    path = folder / "local_mc.yaml"
    path.write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
{listed}""")
    return path
