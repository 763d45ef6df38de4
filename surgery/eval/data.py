"""Evaluation data on local files: loaded and validated once, where they enter.

    ds = load_dataset("sw", "texts/sw.txt")           # kind 'text': one document per line
    ds = load_dataset("mgsm", "tasks/mgsm_sw.jsonl")  # kind from the keys of the first record
    ds.kind, len(ds.items), ds.items[0]

Kinds, told apart by the keys of each JSONL record (every record of a file must be the same kind):
  - text:        a ``.txt`` file (one document per non-empty line) or ``{"text": ...}``
  - generation:  ``{"prompt": ..., "answer": ...}``  (answer: a string or a number)
  - choice:      ``{"prompt": ..., "choices": [...], "label": i}``
Other keys are ignored. A malformed line is an error naming ``file:line``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.io.files import json_lines, read_text

KINDS = ("text", "generation", "choice")


@dataclass
class Dataset:
    """A validated evaluation set. ``items``: str (text), {prompt, answer} or {prompt, choices, label}."""

    name: str
    kind: str
    items: list = field(repr=False)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.items)


def parse_data_arg(arg: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH is named after its file stem."""
    name, sep, path = arg.partition("=")
    if not sep:
        return Path(arg).stem, arg
    if not name or not path:
        raise SurgeryError(f"--data {arg!r}: expected NAME=PATH")
    return name, path


def load_dataset(name: str, path: str | Path, *, limit: int | None = None, seed: int = 0) -> Dataset:
    """Read and validate one file. ``limit`` keeps that many items, drawn at random with ``seed``
    (in file order) when the file has more."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path}: data file not found" + (" (it is a directory)" if path.is_dir() else ""))
    text = read_text(path)
    if path.suffix == ".jsonl":
        kind, items = _read_jsonl(path, text)
    elif path.suffix == ".txt":
        kind, items = "text", [line for line in text.splitlines() if line.strip()]
    else:
        raise SurgeryError(f"{path}: unknown data format {path.suffix!r}; use .txt (one document a line) or .jsonl")
    if not items:
        raise SurgeryError(f"{path}: no items")
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return Dataset(name, kind, items, path)


def load_datasets(data, *, limit: int | None = None, seed: int = 0) -> list[Dataset]:
    """Load several data sets once, to reuse them across evaluations (e.g. every trial of a search).

    ``data``: {name: path}, or a list of 'NAME=PATH' strings, paths or Dataset objects.
    Names must be unique."""
    if isinstance(data, (str, Path, Dataset)):
        data = [data]
    pairs = data.items() if isinstance(data, dict) else [d if isinstance(d, Dataset) else parse_data_arg(str(d))
                                                         for d in data]
    out = [d if isinstance(d, Dataset) else load_dataset(d[0], d[1], limit=limit, seed=seed) for d in pairs]
    names = [d.name for d in out]
    for n in names:
        if names.count(n) > 1:
            raise SurgeryError(f"data set name {n!r} given twice; name them: --data NAME=PATH")
    return out


def _read_jsonl(path: Path, text: str) -> tuple[str, list]:
    kind, items = None, []
    for lineno, record in json_lines(path, text):
        where = f"{path}:{lineno}"
        this = _kind(record, where)
        if kind is not None and this != kind:
            raise SurgeryError(f"{where}: a {this} record in a file of {kind} records")
        kind = this
        items.append(_item(record, kind, where))
    return kind or "text", items


def _kind(record: dict, where: str) -> str:
    if "choices" in record:
        return "choice"
    if "answer" in record:
        return "generation"
    if "text" in record:
        return "text"
    raise SurgeryError(f"{where}: cannot tell the record's kind from its keys {sorted(record)}; expected "
                       "'text', or 'prompt' and 'answer', or 'prompt', 'choices' and 'label'")


def _item(record: dict, kind: str, where: str):
    def string(key):
        value = record.get(key)
        if not isinstance(value, str):
            raise SurgeryError(f"{where}: '{key}' must be a string" + ("" if key in record else ", and is missing"))
        return value

    if kind == "text":
        return string("text")
    if kind == "generation":
        answer = record.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise SurgeryError(f"{where}: 'answer' must be a string or a number")
        return {"prompt": string("prompt"), "answer": str(answer)}
    choices, label = record.get("choices"), record.get("label")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise SurgeryError(f"{where}: 'choices' must be a list of at least two strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise SurgeryError(f"{where}: 'label' must be an index into 'choices' (0-{len(choices) - 1}), got {label!r}")
    return {"prompt": string("prompt"), "choices": choices, "label": label}
