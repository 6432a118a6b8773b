"""Position-embedding patches (optimum_observer/patches/positions.py): Reformer's axial position
embeddings select positions in a Python loop over the batch after a data-dependent cut."""

from __future__ import annotations

import unittest

import torch

from legacy_shim.tooling.tiny_configs import build_tiny_model
from optimum_observer.patches import PATCHES, applied

PATCH = [p for p in PATCHES if p.name == "reformer_axial_positions_gathered"]


def _positions(batch: int, length: int, seed: int) -> torch.Tensor:
    # Left-padded rows, as the runtime feeds them: padding at position 1, then 0, 1, 2...
    positions = torch.arange(length).repeat(batch, 1)
    pads = torch.randint(0, length, (batch,), generator=torch.Generator().manual_seed(seed))
    return torch.where(positions < pads[:, None], 1, positions - pads[:, None])


class TestReformerAxialPositions(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        model = build_tiny_model("reformer", "AutoModelForCausalLM").eval()
        cls.embeddings = next(m for m in model.modules() if type(m).__name__ == "AxialPositionEmbeddings")

    def export(self, patches) -> torch.export.ExportedProgram:
        dims = {"position_ids": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}}
        with applied(patches), torch.no_grad():
            return torch.export.export(self.embeddings, (_positions(2, 3, 0),), dynamic_shapes=dims, strict=False)

    def test_one_program_for_every_batch_and_length_with_the_patch(self):
        program = self.export(PATCH).module()
        for batch, length in ((1, 1), (3, 7), (4, 20)):
            positions = _positions(batch, length, batch)
            with torch.no_grad():
                torch.testing.assert_close(program(positions), self.embeddings(positions))

    def test_without_it_torch_export_fixes_the_batch(self):
        with self.assertRaisesRegex(torch._dynamo.exc.UserError, r"size\(\)\[0\] as dynamic but .* constant \(2\)"):
            self.export([])
