"""Build hook: puts `optimum_observer_hook.pth` at the top of site-packages.

Everything else is declared in pyproject.toml. The .pth file (see legacy_shim/_hook.py) must sit
next to the installed packages, which package data cannot express. `build_py` copies it to the
build tree for wheels (`pip install .`), and to the unpacked editable wheel for
`pip install -e .` (where setuptools points `install_lib` during an editable build).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = os.path.join("legacy_shim", "optimum_observer_hook.pth")


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.mkpath(target)
        self.copy_file(PTH, os.path.join(target, os.path.basename(PTH)), preserve_mode=False)


setup(cmdclass={"build_py": build_py_with_pth})
