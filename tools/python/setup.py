"""Install hook for peerlayer: records where this checkout's build/lib is, so a
non-editable `pip install tools/python` still finds the libpeer.so built there
(the PEER_LIBRARY environment variable overrides it).  Metadata is in
pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

REPO_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


class BuildPy(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "peerlayer", "_install.py")
        with open(target, "w") as f:
            f.write('"""Written at install time: the checkout that built libpeer."""\n')
            f.write(f"REPO_ROOT = {REPO_ROOT!r}\n")


setup(cmdclass={"build_py": BuildPy})
