"""setuptools build that drives CMake (the pybind11 cmake_example pattern).

`pip install --no-build-isolation .` builds vlmkit._C against the torch of the
running Python. VLMKIT_BUILD_DIR picks the CMake build folder (default
build/python; `make` shares its own build folder so nothing compiles twice);
VLMKIT_CMAKE_ARGS adds CMake arguments.
"""
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        build_dir = os.path.abspath(os.environ.get("VLMKIT_BUILD_DIR", os.path.join(ROOT, "build", "python")))
        args = [
            "-DVLMKIT_BUILD_PYTHON=ON",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        if not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            args.append("-DCMAKE_BUILD_TYPE=Release")
            if shutil.which("ninja"):
                args += ["-G", "Ninja"]
        args += shlex.split(os.environ.get("VLMKIT_CMAKE_ARGS", ""))
        subprocess.check_call(["cmake", "-S", ROOT, "-B", build_dir, *args])
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call(["cmake", "--build", build_dir, "--target", "_C", "--parallel", jobs])
        built = [f for f in os.listdir(build_dir) if f.startswith("_C.") and f.endswith(".so")]
        if not built:
            raise RuntimeError(f"CMake did not produce the _C extension in {build_dir}")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(build_dir, built[0]), target)


setup(ext_modules=[CMakeExtension("vlmkit._C")], cmdclass={"build_ext": CMakeBuild})
