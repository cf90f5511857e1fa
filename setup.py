"""Build hook: compiles the machine's C hot path with cffi (everything else is in pyproject.toml)."""
from setuptools import setup

setup(cffi_modules=["emu/fastpath_build.py:ffi"])
