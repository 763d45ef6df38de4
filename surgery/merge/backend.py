"""A row of the backend table (``table``): one implementation of one merge method and what it can do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

HOST = ("compiled", "numpy")  # backends that compute on numpy arrays, without torch (core.host_math)
BITWISE = "bitwise equal to mergekit"


def _always(params: dict, dtype: str | None) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    """One implementation of one merge method.

    ``kernel``: for host backends ``kernel(params, dtype, stored) -> core.graph.HostKernel`` (``dtype``: the merge
    dtype, ``stored``: the inputs' safetensors dtypes); for torch and mergekit ``kernel(tensors, params,
    parameters) -> tensor`` (``parameters``: mergekit's form, ``mergekit_parameters``). A ``wraps`` backend (LiNeS,
    consensus) post-processes its node's ``base_method``: ``table.run`` computes that method first, by its own
    backend, and calls ``kernel(tensors, params, merged)``."""

    method: str
    name: str                       # "compiled", "numpy", "torch" or "mergekit"
    kernel: Callable[..., Any]
    exact: str = BITWISE            # the contract, checked by the tests against mergekit
    dtypes: tuple[str, ...] = ()    # merge dtypes (safetensors names) it computes in; () any
    devices: tuple[str, ...] = ("cpu",)
    needs: tuple[str, ...] = ()     # compiled modules (``native``) it needs
    when: Callable[[dict, str | None], bool] = _always  # other conditions on the node's parameters
    note: str = ""                  # what the conditions are, for the printed table
    wraps: bool = False             # takes the result of the node's base_method (``table.run``)

    @property
    def host(self) -> bool:
        return self.name in HOST

    def available(self) -> bool:
        from surgery.merge import native

        return all(native.load(m) is not None for m in self.needs)
