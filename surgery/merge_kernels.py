"""Faster exact kernels for some mergekit methods (placeholder until measured)."""

from __future__ import annotations


def fast_kernel(method: str, parameters: dict):
    return None
