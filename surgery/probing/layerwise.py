"""Per-layer measures on mean-pooled hidden states: linear probing and cross-lingual alignment.

    accuracy, std = probe_accuracy(X, labels)      # X: (texts, hidden) of one layer
    a = alignment(src, tgt)                        # rows i of src and tgt are translations

Probing is scikit-learn's LogisticRegression on standardised features, scored by stratified k-fold
cross-validation (accuracy on held-out folds). Alignment uses cosine similarity: the mean over
translation pairs, the mean over all non-matching pairs (the "random pair" baseline), and retrieval
accuracy, the share of sentences whose nearest neighbour (by cosine) on the other side is their
translation, in both directions. Retrieval and ``centered_cosine`` use each side minus its mean
vector (Libovický et al. 2020): hidden states share large offsets (outlier dimensions, the
language's own direction) that otherwise dominate every cosine. Retrieval runs in row blocks, so
memory is bounded by ``block`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from surgery.errors import SurgeryError


def require_sklearn() -> None:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise SurgeryError("probing needs scikit-learn: pip install 'surgery[probe]' (or run with --no-probing)")


def probe_accuracy(X: np.ndarray, labels, folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the cross-validated accuracy of a logistic-regression probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    _, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min()))
    if len(counts) < 2 or k < 2:
        raise SurgeryError("probing needs at least two labels with at least two texts each")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = cross_val_score(model, np.asarray(X, dtype=np.float64), y, cv=cv)
    return float(scores.mean()), float(scores.std())


def chance(labels) -> float:
    """Accuracy of always answering the most frequent label."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())


@dataclass
class Alignment:
    pair_cosine: float      # mean cosine of translation pairs
    random_cosine: float    # mean cosine of non-matching pairs
    centered_cosine: float  # mean cosine of translation pairs after subtracting each side's mean
    retrieval: float        # share of src sentences whose nearest tgt sentence is the translation (centred)
    retrieval_back: float   # the same from tgt to src

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _retrieval(a: np.ndarray, b: np.ndarray, block: int) -> float:
    hits = 0
    for start in range(0, len(a), block):
        sims = a[start:start + block] @ b.T
        hits += int((sims.argmax(1) == np.arange(start, start + len(sims))).sum())
    return hits / len(a)


def alignment(src: np.ndarray, tgt: np.ndarray, block: int = 1024) -> Alignment:
    if src.shape != tgt.shape or len(src) < 2:
        raise ValueError(f"alignment needs two arrays of the same shape with >= 2 rows, got {src.shape}, {tgt.shape}")
    a, b = _unit(src), _unit(tgt)
    n = len(a)
    diag = (a * b).sum(1)
    off = float(a.sum(0) @ b.sum(0) - diag.sum()) / (n * (n - 1))
    src, tgt = np.asarray(src, dtype=np.float64), np.asarray(tgt, dtype=np.float64)
    ca, cb = _unit(src - src.mean(0)), _unit(tgt - tgt.mean(0))
    return Alignment(float(diag.mean()), off, float((ca * cb).sum(1).mean()), _retrieval(ca, cb, block),
                     _retrieval(cb, ca, block))
