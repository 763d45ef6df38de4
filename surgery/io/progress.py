"""The one rule for progress bars, ours and the libraries' (transformers' weight loading, Hub downloads).

    show = progress_wanted(quiet, as_json)     # a person at a terminal, not --quiet, not --json
    with library_bars(show):
        model = AutoModelForCausalLM.from_pretrained(...)   # its "Loading weights" bar only if show

Bars are for a person watching: never into a pipe or a log file, never with --quiet or --json. A command
decides once (``decide``); what runs beneath it (a download deep inside ``Checkpoint.open``) follows that
decision through ``library_bars()``. Without a command (the Python API) the terminal decides.
"""

from __future__ import annotations

import contextlib
import sys

_decided: bool | None = None  # the running command's decision; None: none made (the Python API)


def progress_wanted(*silenced: bool) -> bool:
    """Bars only for a person at a terminal: not when any of ``silenced`` (--quiet, --json) is set, not into
    pipes or log files."""
    return not any(silenced) and _terminal()


def _terminal() -> bool:
    return sys.stderr.isatty()


def decide(*silenced: bool) -> bool:
    """``progress_wanted(*silenced)``, kept as the running command's decision for the bars beneath it."""
    global _decided
    _decided = progress_wanted(*silenced)
    return _decided


def forget() -> None:
    """End of a command: its decision no longer applies."""
    global _decided
    _decided = None


def bars_on(enabled: bool | None = None) -> bool:
    """``enabled``, else the running command's decision, else whether stderr is a terminal."""
    if enabled is not None:
        return enabled
    return _decided if _decided is not None else progress_wanted()


@contextlib.contextmanager
def library_bars(enabled: bool | None = None):
    """huggingface_hub's bars (downloads, uploads) and transformers' (weight loading) on or off
    (``bars_on(enabled)``) for the block, and as they were after it. Blocks inside it without a setting of
    their own follow it."""
    global _decided
    from huggingface_hub.utils import are_progress_bars_disabled

    on, outer = bars_on(enabled), _decided
    tf = sys.modules.get("transformers.utils.logging")
    hub_was, tf_was = not are_progress_bars_disabled(), tf.is_progress_bar_enabled() if tf else None
    _decided = on
    _switch(on, on)
    try:
        yield on
    finally:
        _decided = outer
        _switch(hub_was, hub_was if tf_was is None else tf_was)  # transformers imported in the block: as the Hub


def _switch(hub_on: bool, tf_on: bool) -> None:
    import warnings

    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    tf = sys.modules.get("transformers.utils.logging")
    with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS has priority; the Hub warns that it does
        warnings.simplefilter("ignore")
        if tf is not None:  # sets the Hub's too: the Hub's own state is set after it
            (tf.enable_progress_bar if tf_on else tf.disable_progress_bar)()
        (enable_progress_bars if hub_on else disable_progress_bars)()
