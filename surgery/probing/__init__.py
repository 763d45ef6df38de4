"""Activation-level analysis: language-specific neurons (LAPE), layer-wise probing, cross-lingual alignment.

    from surgery.probing import probe
    r = probe("base/", texts={"en": "en.txt", "de": "de.txt"}, parallel=["en-de.jsonl"])

See docs/probe.md. ``surgery.probing.mo_data`` makes parallel texts from the system's gettext catalogs.
"""

from surgery.probing.api import probe
from surgery.probing.lape import LapeSettings, Neuron
from surgery.probing.result import ModelProbe, ProbeResult

__all__ = ["probe", "ProbeResult", "ModelProbe", "LapeSettings", "Neuron"]
