"""Finds, checks and loads the native ops in csrc/ (DeepSpeed's op_builder interface): AsyncIOBuilder.

`from moe.ops.op_builder import AsyncIOBuilder; h = AsyncIOBuilder().load().aio_handle(...)` is the
DeepNVMe spelling. This file imports nothing from `moe` (setup.py loads it by path) and imports torch
lazily, so it works before anything is built.
"""
from __future__ import annotations

import ctypes.util
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_HELP = (
    "Build it with `make setup` (installs libaio-dev through apt when root), or by hand: "
    "`sudo apt-get install libaio-dev` (Fedora/RHEL: `dnf install libaio-devel`), then "
    "`pip install --no-build-isolation -e .` from the repository root."
)


class OpBuilder:
    """One native op: where its sources are, whether it can be built here, and how to load it."""

    NAME = ""
    MODULE = ""  # importable name of the prebuilt extension (built by setup.py)

    def sources(self) -> List[str]:
        raise NotImplementedError

    def include_paths(self) -> List[str]:
        return []

    def libraries(self) -> List[str]:
        return []

    def cxx_args(self) -> List[str]:
        return ["-O3", "-Wall", "-fvisibility=hidden"]

    def is_compatible(self, verbose: bool = False) -> bool:
        raise NotImplementedError

    def prebuilt_available(self) -> bool:
        """Whether setup.py built the extension (the module file is importable)."""
        return importlib.util.find_spec(self.MODULE) is not None

    def load(self, verbose: bool = False, allow_jit: bool = True):
        """Returns the built extension module.

        Falls back to compiling the sources now (torch.utils.cpp_extension.load, cached under
        build/jit) when the prebuilt module is absent but the op can be built here.

        Raises:
            RuntimeError: the op is neither built nor buildable; the message says how to fix it.
        """
        try:
            return importlib.import_module(self.MODULE)
        except ImportError as err:
            prebuilt_error = err
        sources_present = all(Path(src).is_file() for src in self.sources())
        if allow_jit and sources_present and self.is_compatible(verbose=verbose):
            return self.jit_load(verbose=verbose)
        reasons = [f"import {self.MODULE} failed ({prebuilt_error})"]
        if not sources_present:
            reasons.append(f"sources missing under {REPO_ROOT / 'csrc'}")
        elif not allow_jit:
            reasons.append("JIT build not allowed")
        else:
            reasons.append(self.incompatible_reason())
        raise RuntimeError(f"native op '{self.NAME}' is not available: {'; '.join(reasons)}. {BUILD_HELP}")

    def incompatible_reason(self) -> str:
        return "not compatible with this system"

    def jit_load(self, verbose: bool = False):
        from torch.utils import cpp_extension

        build_dir = REPO_ROOT / "build" / "jit" / self.NAME
        build_dir.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(
            name=self.MODULE.rsplit(".", 1)[-1],
            sources=self.sources(),
            extra_include_paths=self.include_paths(),
            extra_cflags=self.cxx_args(),
            extra_ldflags=[f"-l{lib}" for lib in self.libraries()],
            build_directory=str(build_dir),
            verbose=verbose,
        )

    def extension(self):
        """The setuptools Extension that builds this op (setup.py)."""
        from torch.utils.cpp_extension import CppExtension

        root = str(REPO_ROOT)
        return CppExtension(
            name=self.MODULE,
            sources=[os.path.relpath(src, root) for src in self.sources()],
            include_dirs=self.include_paths(),
            libraries=self.libraries(),
            extra_compile_args={"cxx": self.cxx_args()},
        )


class AsyncIOBuilder(OpBuilder):
    """csrc/aio: the DeepNVMe-compatible `aio_handle` on libaio."""

    NAME = "async_io"
    MODULE = "moe.ops._aio"

    def sources(self) -> List[str]:
        return sorted(str(p) for p in (REPO_ROOT / "csrc" / "aio").glob("*.cpp"))

    def include_paths(self) -> List[str]:
        return [str(REPO_ROOT / "csrc" / "aio")]

    def libraries(self) -> List[str]:
        return ["aio"]

    @staticmethod
    def libaio_header() -> Optional[str]:
        """Path of libaio.h on the compiler's usual search path (plus CPATH / conda), or None."""
        dirs = ["/usr/include", "/usr/local/include"]
        for var in ("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH"):
            dirs += [d for d in os.environ.get(var, "").split(os.pathsep) if d]
        if os.environ.get("CONDA_PREFIX"):
            dirs.append(os.path.join(os.environ["CONDA_PREFIX"], "include"))
        for d in dirs:
            path = os.path.join(d, "libaio.h")
            if os.path.isfile(path):
                return path
        return None

    @staticmethod
    def libaio_library() -> Optional[str]:
        """Name of the loadable libaio shared library (ctypes.util.find_library), or None."""
        return ctypes.util.find_library("aio")

    def is_compatible(self, verbose: bool = False) -> bool:
        """Whether libaio is usable: its runtime library loads, and either the op is already built or
        its header is present to build it."""
        ok = sys.platform.startswith("linux") and self.libaio_library() is not None and (
            self.prebuilt_available() or self.libaio_header() is not None)
        if verbose and not ok:
            print(f"[op_builder] {self.NAME}: {self.incompatible_reason()}", file=sys.stderr)
        return ok

    def incompatible_reason(self) -> str:
        if not sys.platform.startswith("linux"):
            return f"libaio needs Linux, this is {sys.platform}"
        missing = []
        if self.libaio_library() is None:
            missing.append("libaio shared library (libaio1 / libaio1t64)")
        if self.libaio_header() is None:
            missing.append("libaio.h (libaio-dev)")
        return ("missing " + " and ".join(missing)) if missing else "libaio found"
