"""Build script: pure-Python packages plus the optional native ops in csrc/ (see moe/ops/op_builder.py).

The aio extension (moe.ops._aio) is built with torch's cpp_extension when torch is importable at build
time (`pip install --no-build-isolation -e .`) and libaio.h is found; otherwise a warning is printed
and only the Python packages are installed. MOE_BUILD_AIO=0 skips it on purpose.
"""
import importlib.util
import os
import sys

from setuptools import setup


def _load_op_builder():
    # By path: importing the `moe` package here would import torch-dependent model code.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe", "ops", "op_builder.py")
    spec = importlib.util.spec_from_file_location("_moe_op_builder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _warn(message):
    print(f"\nWARNING (megatron-moe setup.py): {message}\n", file=sys.stderr)


def native_extensions():
    """(ext_modules, cmdclass) for the native ops that can be built here."""
    if os.environ.get("MOE_BUILD_AIO", "1") == "0":
        _warn("MOE_BUILD_AIO=0: not building the aio extension (moe.ops._aio).")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        _warn("torch is not importable at build time, so the aio extension (moe.ops._aio) is not built. "
              "Install torch first and use `pip install --no-build-isolation -e .`.")
        return [], {}
    builder = _load_op_builder().AsyncIOBuilder()
    if builder.libaio_header() is None:
        _warn("libaio.h not found, so the aio extension (moe.ops._aio) is not built. "
              + _load_op_builder().BUILD_HELP)
        return [], {}
    return [builder.extension()], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
