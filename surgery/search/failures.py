"""Failed trials: when a search stops before its budget, and the line that says no trial completed.

    watch = FailureWatch(spec)
    watch.failed("base: no tokenizer files ...", trial.params)   # after each failed evaluation
    watch.stop          # the error every trial would fail with, once the rule holds; else None
    failure(rows, stopped=watch.stop)   # 'no trial completed: ...' when none did; else None

The rule for stopping early (docs/search.md): no trial of this run has completed, and the first
``STOP_AFTER`` trials it evaluated all failed with the identical message, a message that names none of
their values. Then the error does not depend on the trial (a model without a
tokenizer, data that cannot be read), and every further trial would spend its time failing the same
way. A message that names a value ('bottom 12 + top 2 layers exceed ...') never stops a search: another
point of the space may well work.
"""

from __future__ import annotations

import re
from collections import Counter

STOP_AFTER = 3


class FailureWatch:
    def __init__(self, spec):
        self.spec = spec
        self.failures: list[str] | None = []  # the errors of this run's evaluations; None once the rule cannot hold
        self.values: list = []                # every value those trials gave their variables
        self.stop: str | None = None

    def completed(self) -> None:
        self.failures = None

    def failed(self, message: str, params: dict) -> None:
        if self.failures is None or self.stop is not None:
            return
        self.failures.append(message)
        self.values += [v.value(params[n]) for v in self.spec.variables for n in v.param_names() if n in params]
        if len(set(self.failures)) > 1:  # not one error for all: the rule can no longer hold in this run
            self.failures = None
        elif len(self.failures) >= STOP_AFTER and not any(names_value(message, v) for v in self.values):
            self.stop = message


def names_value(message: str, value) -> bool:
    """True if the message shows the value (any scalar inside it) as a word of its own."""
    for text in _texts(value):
        if re.search(rf"(?<![\w.]){re.escape(text)}(?![\w])", message):
            return True
    return False


def _texts(value) -> set[str]:
    if isinstance(value, dict):
        return {t for k, v in value.items() for t in _texts(k) | _texts(v)}
    if isinstance(value, (list, tuple)):
        return {t for v in value for t in _texts(v)}
    if value is None:
        return set()
    texts = {str(value)}
    if isinstance(value, bool):
        texts.add(str(value).lower())
    elif isinstance(value, float):
        texts |= {f"{value:g}", f"{value:.4g}", repr(value)}
    return {t for t in texts if t}


def failure(rows: list[dict], stopped: str | None = None) -> str | None:
    """One line when trials finished and none completed: how many, and the most common error."""
    if not rows or any(r["state"] == "complete" for r in rows):
        return None
    if stopped is not None:
        return (f"no trial completed: the search stopped after {len(rows)} trials, which all failed with the same "
                f"error, one that names none of their values, so every trial would fail: {stopped}")
    errors = Counter(r.get("error") or "(no error recorded)" for r in rows)
    error, count = errors.most_common(1)[0]
    return f"no trial completed: all {len(rows)} trials failed, {count} of them with: {error}"
