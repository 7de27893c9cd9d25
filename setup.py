"""Build the optional native CPU kernels (csrc/) into lowband/_native*.so.

The library is plain C loaded with ctypes: no torch or Python headers are needed
to build it. If no C compiler is present the build step fails softly, the package
still installs, and lowband.kernels serves the torch backend with a WARNING.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - a missing compiler must not break install
            print(f"lowband: native kernels not built ({e}); the torch backend will serve", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"lowband: native kernels not built ({e}); the torch backend will serve", file=sys.stderr)

    def get_ext_filename(self, ext_name: str) -> str:
        # A plain shared library, not a CPython module: name it without the ABI tag.
        return os.path.join(*ext_name.split(".")) + ".so"


sources = sorted(glob.glob("csrc/*.c"))
ext_modules = []
if sources:
    ext_modules.append(
        Extension(
            "lowband._native",
            sources=sources,
            include_dirs=["csrc"],
            extra_compile_args=["-O3", "-std=c11", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
            libraries=["m"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
