"""Sizes of the three modes. Chosen for 2 CPU cores (see README: why these numbers), not tuned on results."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Settings:
    mode: str
    # fine-tuning (all three experts: same learning rate, schedule and token budget per step)
    lr: float = 1e-4
    math_train: int = 2400        # distinct English training problems
    math_steps: int = 36
    math_batch: int = 16          # problems per step (~40 tokens each)
    lang_steps: int = 20
    lang_batch: int = 8           # chunks of seq_len tokens per step
    seq_len: int = 128
    # evaluation
    math_test: int = 64           # held-out problems, the same ones in English and German
    math_dev: int = 32            # German dev problems, only for the search
    text_eval: int = 80           # held-out catalog strings per language, for perplexity
    probe_texts: int = 80         # strings per language for `surgery probe`
    eval_batch: int = 32
    max_new_tokens: int = 16
    # surgery
    ranked_k: int = 8
    ranked_transition: int = 1
    hand: tuple = ((4, 2, 0), (6, 2, 1), (8, 3, 2))   # (bottom, top, transition)
    search_trials: int = 5
    search_max: tuple = (10, 5)                       # bottom in 0..10, top in 0..5
    mask_langs: tuple = ("de", "en", "fr")           # LAPE neuron sets zeroed one at a time
    other_langs: tuple = ("fr", "es")                 # extra languages for LAPE

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Settings("full")
# quick: every stage, about a quarter of the work; under 10 minutes on 2 cores (measured: docs/case_study.md's note)
QUICK = Settings("quick", math_train=400, math_steps=12, math_batch=8, lang_steps=6, lang_batch=4, math_test=20,
                 math_dev=12, text_eval=40, probe_texts=30, hand=((6, 2, 1),), search_trials=2, mask_langs=("de",),
                 other_langs=("fr",))
SMOKE = Settings("smoke", math_train=64, math_steps=2, math_batch=4, lang_steps=2, lang_batch=2, seq_len=32,
                 math_test=4, math_dev=4, text_eval=4, probe_texts=12, eval_batch=8, max_new_tokens=8,
                 hand=((6, 2, 1),), search_trials=2, mask_langs=("de",), other_langs=("fr",))
MODES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
