"""Build script: packages + the ``k15sys._C`` pybind11 extension, compiled through CMake/ninja.

``kernels/`` (Triton sources) ships as the subpackage ``k15sys.kernels``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configure and build one CMake project; the library lands where setuptools expects it."""

    def build_extension(self, ext: CMakeExtension) -> None:  # type: ignore[override]
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        configure = [
            "cmake", "-S", ext.source_dir, "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


packages = find_packages(include=["k15sys", "k15sys.*"]) + ["k15sys.kernels"]

setup(
    packages=packages,
    package_dir={"k15sys.kernels": "kernels"},
    ext_modules=[CMakeExtension("k15sys._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
