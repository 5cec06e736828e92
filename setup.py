"""Build script: pure-Python packages plus the optional native ops in csrc/ (see moe/ops/op_builder.py)."""
from setuptools import setup

setup()
