"""Builds the C++ evaluation core `lorafit._C` (metadata lives in pyproject.toml)."""

import platform
import sys
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

compile_args = ["-O3", "-fno-math-errno"]
link_args = []
if sys.platform != "darwin":  # Apple clang has no -fopenmp; the kernels then run serially
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
# No -march=native: SIMD code paths are chosen at run time (see csrc/simd.h).
if platform.machine().lower() in ("x86_64", "amd64"):
    compile_args.append("-Wno-psabi")

ext_modules = [
    Pybind11Extension(
        "lorafit._C",
        sorted(glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        depends=sorted(glob("csrc/*.h")),  # rebuild on header changes; ship them in sdists
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
