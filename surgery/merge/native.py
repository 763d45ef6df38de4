"""The compiled kernels (``_introsort.c``, ``_elementwise.c``; built by ``pip install``, optional).

    kernels = native.load("_elementwise")   # the module, or None: not built, or the backend level excludes them

Callers fall back to their numpy (or torch) code where it is None; the results are the same bytes. The backend
level (``surgery run --backend numpy``, ``core.devices.backend``) turns them off for comparisons.
"""

from __future__ import annotations

import importlib

from surgery.core import devices


def load(name: str):
    """``surgery.merge.<name>``, or None where it is not built or the backend level is not 'auto'."""
    if devices.backend() != "auto":
        return None
    return built(name)


def built(name: str):
    """``surgery.merge.<name>`` whatever the backend level, or None where it is not built."""
    try:  # by name: ``from surgery.merge import _introsort`` reads as importing the package (a cycle)
        return importlib.import_module(f"surgery.merge.{name}")
    except ImportError:
        return None
