import sys
from pathlib import Path

# The test helpers (tiny_models, ...) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
