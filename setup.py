"""The compiled kernels of surgery.merge (the exact TIES top-k, ``topk``; linear, task arithmetic and TIES in one
pass) (metadata: pyproject.toml).

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
    Extension("surgery.merge._introsort", ["surgery/merge/_introsort.c"], optional=True),
    Extension("surgery.merge._elementwise", ["surgery/merge/_elementwise.c"], optional=True,
              depends=["surgery/merge/_buffers.h"],
              extra_compile_args=NO_CONTRACT),
])
