"""Publishing an export: atomic at directory level under kills, safe under concurrent processes,
umask-following, and never deleting a user's directory (issue 13, items 3, 4, 5, 6, 7)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import unittest
from pathlib import Path

from parameterized import parameterized

from optimum_observer import ObserverExportError, Stage, packaging
from reliability_helpers import run_script


_HARNESS: dict[str, list[dict]] = {}


def _cases(mode: str) -> list[dict]:
    """The harness's cases of `mode`; the harness runs once (one import of torch) for all."""
    if not _HARNESS:
        with tempfile.TemporaryDirectory() as scratch:
            done = run_script("publish_harness.py", str(Path(scratch) / "work"), timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        for line in done.stdout.splitlines():
            case = json.loads(line)
            _HARNESS.setdefault(case["mode"], []).append(case)
    return _HARNESS[mode]


class TestKilledPublish(unittest.TestCase):
    """A previous export plus the user's files in OUT; the new export's publish killed before
    each of its filesystem changes in turn (tests/reliability/publish_harness.py)."""

    def test_sigkill_at_any_step_leaves_the_previous_or_the_new_export_never_a_mix(self):
        cases = _cases("kill KILL")
        self.assertGreater(len(cases), 5)
        self.assertEqual({c["after"] for c in cases}, {"old", "new"}, cases)

    def test_the_next_export_cleans_what_a_sigkill_left(self):
        cases = _cases("kill KILL")
        self.assertTrue(any(c["left"] for c in cases), "no kill left anything: the test kills too late")
        self.assertEqual([(c["after_next"], c["left_next"]) for c in cases], [("new", [])] * len(cases))

    def test_sigterm_at_any_step_leaves_no_staging_directory(self):
        cases = _cases("kill TERM")
        self.assertEqual({c["after"] for c in cases}, {"old", "new"}, cases)
        self.assertEqual([c["left"] for c in cases], [[]] * len(cases))
        # Terminated = SystemExit(128 + SIGTERM): the process still ends as the signal asked.
        self.assertEqual({c["status"] for c in cases[:-1]}, {"exit 143"})

    def test_without_renameat2_a_sigkill_leaves_the_previous_export_aside_for_the_next_export(self):
        cases = _cases("kill KILL fallback")
        for case in cases:
            if case["after"] == "missing":
                self.assertTrue(any(".out.previous-" in name for name in case["left"]), case)
            else:
                self.assertIn(case["after"], ("old", "new"), case)
        self.assertEqual([(c["after_next"], c["left_next"]) for c in cases], [("new", [])] * len(cases))


class TestConcurrentPublish(unittest.TestCase):
    def test_two_processes_creating_one_output_both_succeed_and_it_is_one_whole_export(self):
        (case,) = _cases("race")
        self.assertEqual(case["statuses"], ["exit 0", "exit 0"], case)
        self.assertTrue(case["whole"], case)
        self.assertEqual(case["left"], [])


class TestOutputDirectory(unittest.TestCase):
    def setUp(self):
        self._scratch = tempfile.TemporaryDirectory()
        self.scratch = Path(self._scratch.name)
        self.output = self.scratch / "out"

    def tearDown(self):
        self._scratch.cleanup()

    def _publish(self, files=("model.onnx", "config.json")) -> None:
        with packaging.staged_output(self.output, "llama") as staging:
            for name in files:
                (staging / name).write_text("new")

    @parameterized.expand([(0o022, 0o755), (0o027, 0o750), (0o002, 0o775)])
    def test_a_new_output_directory_follows_the_umask(self, umask, mode):
        previous = os.umask(umask)
        try:
            self._publish()
        finally:
            os.umask(previous)
        self.assertEqual(stat.S_IMODE(self.output.stat().st_mode), mode)

    def test_an_existing_output_directory_keeps_its_mode(self):
        self.output.mkdir()
        self.output.chmod(0o711)
        self._publish()
        self.assertEqual(stat.S_IMODE(self.output.stat().st_mode), 0o711)

    def test_a_user_directory_named_like_an_output_file_is_refused_and_kept(self):
        user_directory = self.output / "tokenizer.json"
        user_directory.mkdir(parents=True)
        (user_directory / "notes.txt").write_text("mine")
        (self.output / "model.onnx").write_text("old")
        with self.assertRaises(ObserverExportError) as caught:
            self._publish(("model.onnx", "config.json", "tokenizer.json"))
        error = caught.exception
        self.assertEqual((error.model_type, error.stage), ("llama", Stage.PACKAGING))
        self.assertIn("is a directory", str(error))
        self.assertIn("never deletes a directory", error.remedy)
        self.assertEqual((user_directory / "notes.txt").read_text(), "mine")
        self.assertEqual((self.output / "model.onnx").read_text(), "old")
        self.assertEqual([p.name for p in self.scratch.iterdir()], ["out"])

    def test_a_stale_staging_directory_of_a_live_process_is_left_alone(self):
        self.output.mkdir()
        live = self.scratch / f".out.partial-{os.getppid()}-00ff00ff"
        live.mkdir()
        self._publish()
        self.assertTrue(live.is_dir())

    def test_a_staging_directory_of_an_earlier_version_is_reported_not_removed(self):
        old_style = self.scratch / ".out.partial-x1y2z3w4"
        old_style.mkdir()
        with self.assertLogs("optimum_observer.packaging", "WARNING") as logs:
            self._publish()
        self.assertTrue(old_style.is_dir())
        self.assertIn("remove it", "\n".join(logs.output))

