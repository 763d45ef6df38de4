"""The texts `surgery probe` reads, validated once where they enter.

- text files: one text per line, UTF-8, blank lines skipped (``--text de=de.txt``);
- label files: JSONL ``{"text": ..., "label": ...}`` per line (``--labels``);
- parallel files: JSONL with the same two language keys on every line, e.g.
  ``{"en": "Open file", "de": "Datei öffnen"}`` (what `surgery data mo` writes as en-de.jsonl).

Errors name the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.files import json_lines, read_text


@dataclass
class Parallel:
    file: str
    pair: tuple[str, str]
    sentences: list[tuple[str, str]]


@dataclass
class ProbeData:
    texts: dict[str, list[str]] = field(default_factory=dict)     # language -> texts (LAPE; probing by default)
    sources: dict[str, str] = field(default_factory=dict)         # language -> file
    labelled: list[tuple[str, str]] | None = None                  # [(text, label)] from --labels
    labels_file: str | None = None
    parallel: list[Parallel] = field(default_factory=list)


def _read(path: Path) -> str:
    if not path.is_file():
        raise SurgeryError(f"{path}: file not found")
    return read_text(path)


def _lines(path: Path) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(_read(path).splitlines(), 1) if line.strip()]


def read_texts(path) -> list[str]:
    path = Path(path)
    texts = [t for _, t in _lines(path)]
    if not texts:
        raise SurgeryError(f"{path}: no texts (the file is empty)")
    return texts


def _json_lines(path: Path):
    records = list(json_lines(path, _read(path)))
    if not records:
        raise SurgeryError(f"{path}: no lines (the file is empty)")
    return records


def read_labels(path) -> list[tuple[str, str]]:
    path = Path(path)
    out = []
    for no, obj in _json_lines(path):
        text, label = obj.get("text"), obj.get("label")
        if not isinstance(text, str) or not text.strip():
            raise SurgeryError(f"{path}:{no}: 'text' must be a non-empty string")
        if label is None or isinstance(label, (dict, list)):
            raise SurgeryError(f"{path}:{no}: 'label' must be a string or number")
        out.append((text.strip(), str(label)))
    if len({lab for _, lab in out}) < 2:
        raise SurgeryError(f"{path}: probing needs at least two different labels")
    return out


def read_parallel(path) -> Parallel:
    path = Path(path)
    pair, out = None, []
    for no, obj in _json_lines(path):
        keys = tuple(obj)
        if pair is None:
            if len(keys) != 2:
                raise SurgeryError(f"{path}:{no}: expected two languages per line, like "
                                   f'{{"en": "...", "de": "..."}}, got keys {list(keys)}')
            pair = keys
        elif set(keys) != set(pair):
            raise SurgeryError(f"{path}:{no}: mismatched line: keys {list(keys)}, but line 1 has {list(pair)}")
        a, b = obj[pair[0]], obj[pair[1]]
        if not (isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip()):
            raise SurgeryError(f"{path}:{no}: mismatched line: both {pair[0]!r} and {pair[1]!r} need a "
                               "non-empty sentence")
        out.append((a.strip(), b.strip()))
    if len(out) < 2:
        raise SurgeryError(f"{path}: alignment needs at least two sentence pairs")
    return Parallel(str(path), pair, out)


def load_data(texts=None, labels=None, parallel=None, limit: int | None = None) -> ProbeData:
    """texts: {language: file or list of texts}; labels: a JSONL file; parallel: JSONL files.

    ``limit`` keeps the first N texts (pairs) of each file.
    """
    data = ProbeData()
    for lang, src in (texts or {}).items():
        if isinstance(src, (str, Path)):
            data.texts[lang], data.sources[lang] = read_texts(src)[:limit], str(src)
        else:
            items = [str(t).strip() for t in src if str(t).strip()]
            if not items:
                raise SurgeryError(f"texts[{lang!r}]: no texts")
            data.texts[lang], data.sources[lang] = items[:limit], "(list)"
    if labels:
        data.labelled, data.labels_file = read_labels(labels)[:limit], str(labels)
    for p in parallel or []:
        par = read_parallel(p)
        par.sentences = par.sentences[:limit]
        data.parallel.append(par)
    if not (data.texts or data.labelled or data.parallel):
        raise SurgeryError("nothing to probe: give texts (--text LANG=FILE), --labels or --parallel")
    return data
