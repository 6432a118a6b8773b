"""Checkpoints that ship their own code (`auto_map`): validation reloads the export with the same
trust_remote_code, and without the flag the error says to pass it (issue 13, item 10)."""

from __future__ import annotations

import json
import shutil

import pytest

import optimum_observer
from optimum_observer import ObserverExportError, Stage

_CONFIGURATION = """
import pathlib, os
pathlib.Path(os.environ["REMOTE_CODE_MARKER"]).touch()
from transformers import LlamaConfig

class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
"""
_MODELING = """
from transformers import LlamaForCausalLM
from .configuration_tiny_remote import TinyRemoteConfig

class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


@pytest.fixture
def remote_checkpoint(tiny_llama, tmp_path, monkeypatch):
    """The tiny llama as a checkpoint of a model type transformers does not know, with its code;
    importing that code touches the file REMOTE_CODE_MARKER names."""
    source = tmp_path / "remote"
    shutil.copytree(tiny_llama, source)
    config = json.loads((source / "config.json").read_text())
    config.update(
        model_type="tiny_remote",
        architectures=["TinyRemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
        },
    )
    (source / "config.json").write_text(json.dumps(config))
    (source / "configuration_tiny_remote.py").write_text(_CONFIGURATION)
    (source / "modeling_tiny_remote.py").write_text(_MODELING)
    marker = tmp_path / "remote-code-ran"
    monkeypatch.setenv("REMOTE_CODE_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    return source, marker


def test_with_trust_remote_code_the_export_validates(remote_checkpoint, tmp_path):
    source, marker = remote_checkpoint
    result = optimum_observer.export(source, tmp_path / "out", trust_remote_code=True)
    assert result.model_type == "tiny_remote"
    assert result.validation.ok and result.validation.generation
    assert marker.exists()


def test_without_the_flag_the_error_says_to_pass_it_and_no_code_runs(remote_checkpoint, tmp_path):
    source, marker = remote_checkpoint
    with pytest.raises(ObserverExportError) as caught:
        optimum_observer.export(source, tmp_path / "out")
    assert caught.value.stage is Stage.LOAD
    assert "pass trust_remote_code=True (--trust-remote-code)" in caught.value.remedy
    assert "holding config.json" not in caught.value.remedy
    assert not marker.exists()
