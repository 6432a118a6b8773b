"""optimum.onnxruntime's unchanged ORTModel classes never run code from a dimension name of a
model file, with the unchanged-code hook on (issue 13, item 13)."""

from __future__ import annotations

from shim_helpers import run_python

_LOAD_MALICIOUS_FILE = """
import pathlib, shutil
import onnx, torch
from optimum.onnxruntime import ORTModelForCausalLM

source, copy, marker = pathlib.Path({source!r}), pathlib.Path({copy!r}), pathlib.Path({marker!r})
shutil.copytree(source, copy)
model = onnx.load(str(copy / "model.onnx"))
(logits,) = [o for o in model.graph.output if o.name == "logits"]
dim = next(d for d in logits.type.tensor_type.shape.dim if d.dim_param)
# What upstream eval()s after putting known sizes in place of the names around it.
dim.dim_param = f"__import__('pathlib').Path({{str(marker)!r}}).touch() or {{dim.dim_param}}"
onnx.save(model, str(copy / "model.onnx"))
runtime = ORTModelForCausalLM.from_pretrained(copy, use_io_binding=True)
ids = torch.tensor([[5, 6, 7]])
try:
    runtime(input_ids=ids, attention_mask=torch.ones_like(ids))
    print("ran")
except ValueError as error:
    print("refused:", error)
print("code ran:", marker.exists())
"""


def test_a_dimension_name_holding_code_is_never_run_with_the_hook(llama_export, tmp_path):
    code = _LOAD_MALICIOUS_FILE.format(
        source=str(llama_export), copy=str(tmp_path / "malicious"), marker=str(tmp_path / "code-ran")
    )
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # Without the hook's patch (main before issue 13, or OPTIMUM_OBSERVER_DISABLE=1) this prints
    # "ran" and "code ran: True".
    assert "refused: Cannot infer the size of the ONNX dimension" in done.stdout
    assert "code ran: False" in done.stdout
