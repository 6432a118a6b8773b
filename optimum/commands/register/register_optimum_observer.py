"""optimum-cli discovers this module through the `optimum.commands.register` namespace (PEP 420).

It registers no new command: it gives optimum-onnx's `export onnx` the `--exporter` flag (see
`legacy_shim.cli`) for the life of the optimum-cli process, unless OPTIMUM_OBSERVER_DISABLE is set.
"""

import atexit
import contextlib

from legacy_shim._hook import enabled

REGISTER_COMMANDS = []

if enabled():
    from legacy_shim.cli import exporter_flag

    _flag = contextlib.ExitStack()
    _flag.enter_context(exporter_flag())
    atexit.register(_flag.close)
