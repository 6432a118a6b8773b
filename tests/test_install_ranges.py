"""The declared version ranges are true: they admit what CI installs and nothing below it.

Reads the installed distribution's metadata (what pip resolves against) and the two install
files. A lower bound below what CI tests (torch 2.11, where the observer export of a llama fails
at torch.export), or an install file pinning a version the metadata refuses, fails here.
"""

from __future__ import annotations

import importlib.metadata
import unittest
from pathlib import Path

import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "optimum-observer"


def declared(name: str) -> Requirement:
    requirements = [Requirement(line) for line in importlib.metadata.requires(DISTRIBUTION) or ()]
    matches = [r for r in requirements if r.name == name and r.marker is None]
    if len(matches) != 1:
        raise AssertionError(f"{DISTRIBUTION} declares {name} {len(matches)} times: {matches}")
    return matches[0]


def pins(path: Path) -> dict[str, Version]:
    """name -> pinned version of every `name==version` line of a requirements/constraints file."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            if specifier.operator != "==":
                raise AssertionError(f"{path.name}: {line!r} is not pinned with ==")
            found[requirement.name.lower().replace("_", "-")] = Version(specifier.version)
    return found


def admits(requirement: Requirement, version: str | Version) -> bool:
    return requirement.specifier.contains(Version(str(version).split("+")[0]), prereleases=True)


class TestDeclaredRanges(unittest.TestCase):
    def test_torch_below_the_tested_release_is_refused(self):
        torch_requirement = declared("torch")
        self.assertTrue(admits(torch_requirement, torch.__version__), torch_requirement)
        for untested in ("2.11.0", "2.12.1"):
            self.assertFalse(admits(torch_requirement, untested), f"{torch_requirement} admits {untested}")

    def test_transformers_range_admits_the_installed_release_and_nothing_below_ci(self):
        requirement = declared("transformers")
        self.assertTrue(admits(requirement, transformers.__version__), requirement)
        for untested in ("4.56.2", "4.57.5"):
            self.assertFalse(admits(requirement, untested), f"{requirement} admits {untested}")

    def test_both_installs_pin_versions_the_metadata_admits(self):
        for file_name in ("constraints.txt", "requirements-transformers5.txt"):
            pinned = pins(ROOT / file_name)
            for name in ("torch", "transformers"):
                if name in pinned:
                    self.assertTrue(admits(declared(name), pinned[name]), f"{file_name}: {name}=={pinned[name]}")

    def test_the_transformers5_install_pins_every_declared_dependency(self):
        # It is installed with --no-deps: a dependency missing from it would be missing at run time.
        pinned = pins(ROOT / "requirements-transformers5.txt")
        self.assertEqual(pinned["transformers"].major, 5)
        self.assertEqual(pins(ROOT / "constraints.txt")["transformers"].major, 4)
        runtime = [r for r in map(Requirement, importlib.metadata.requires(DISTRIBUTION)) if r.marker is None]
        missing = [r.name for r in runtime if r.name != "torch" and r.name.lower() not in pinned]
        self.assertEqual(missing, [])
