"""The compiled kernels (``_introsort.c``, ``_elementwise.c``; built by ``pip install``, optional).

    kernels = native.load("_elementwise")   # the module, or None: not built, or SURGERY_NATIVE=0

Callers fall back to their numpy (or torch) code where it is None; the results are the same bytes.
"""

from __future__ import annotations

import importlib
import os


def load(name: str):
    """``surgery.operations.<name>``, or None where it is not built or ``SURGERY_NATIVE=0`` asks for the numpy code."""
    if os.environ.get("SURGERY_NATIVE", "1") == "0":
        return None
    try:  # by name: ``from surgery.operations import _introsort`` reads as importing the package (a cycle)
        return importlib.import_module(f"surgery.operations.{name}")
    except ImportError:
        return None
