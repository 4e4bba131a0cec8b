"""setuptools shim: cffi's out-of-line build can only be declared here (cffi_modules)."""

from setuptools import setup

setup(cffi_modules=["cbits/build_cbits.py:ffibuilder"])
