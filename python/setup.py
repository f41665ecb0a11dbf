"""The one build decision pyproject.toml cannot state.

A wheel that carries ``libkvhygiene.so`` (copied next to ``kvhygiene/__init__.py`` before the
build, where :func:`kvhygiene.find_library` looks first) holds machine code: it is tagged for
the platform it was built on (``py3-none-linux_x86_64``, say), never ``py3-none-any``, which
pip would install on any machine, where the library cannot load. The library is loaded
through ctypes, so any Python 3 takes the wheel. Without the library the wheel is pure
Python, as pyproject.toml alone makes it.
"""

from pathlib import Path

from setuptools import setup

LIBRARY = Path(__file__).resolve().parent / "kvhygiene" / "libkvhygiene.so"

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools older than 70.1 builds wheels with the wheel package's
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # no wheel can be built here: nothing to tag
        bdist_wheel = None

cmdclass = {}
if bdist_wheel is not None:

    class PlatformWheel(bdist_wheel):
        def finalize_options(self):
            super().finalize_options()
            if LIBRARY.is_file():
                self.root_is_pure = False

        def get_tag(self):
            python, abi, platform = super().get_tag()
            if LIBRARY.is_file():
                return "py3", "none", platform
            return python, abi, platform

    cmdclass["bdist_wheel"] = PlatformWheel

setup(cmdclass=cmdclass)
