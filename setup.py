"""The compiled kernel of surgery.operations.introsort (metadata: pyproject.toml).

optional=True: without a C compiler the package still installs, and the exact TIES top-k falls back to
its numpy replay. Developers working from the checkout (PYTHONPATH=$PWD) build it in place with
``python setup.py build_ext --inplace``.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("surgery.operations._introsort", ["surgery/operations/_introsort.c"],
                             optional=True)])
