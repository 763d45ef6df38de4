"""The compiled kernels of surgery.operations.introsort and .merge_numpy (metadata: pyproject.toml).

optional=True: without a C compiler the package still installs, and the exact TIES top-k falls back to
its numpy replay, linear and task arithmetic merges to their numpy steps (or torch). Developers working
from the checkout (PYTHONPATH=$PWD) build them in place with ``python setup.py build_ext --inplace``.
"""

import sys

from setuptools import Extension, setup

# _elementwise.c must not let the compiler fuse a multiply and an add on its own (GCC and clang do by default
# for C): its only fused step is the explicit fmaf that reproduces torch's addcmul_
NO_CONTRACT = [] if sys.platform == "win32" else ["-ffp-contract=off"]

setup(ext_modules=[
    Extension("surgery.operations._introsort", ["surgery/operations/_introsort.c"], optional=True),
    Extension("surgery.operations._elementwise", ["surgery/operations/_elementwise.c"], optional=True,
              extra_compile_args=NO_CONTRACT),
])
