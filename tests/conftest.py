import sys
from pathlib import Path

import pytest

# The test helpers (tiny_models, ...) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Tiny models and exports shared by the whole session (tests/session_artifacts.py)."""
    from session_artifacts import SessionArtifacts

    return SessionArtifacts(tmp_path_factory.mktemp("session-artifacts"))


@pytest.fixture(scope="class", autouse=True)
def _artifacts_on_unittest_classes(request):
    """unittest classes cannot take fixtures as arguments: they read the session's artifacts as
    `self.artifacts` (or `cls.artifacts` in setUpClass, which runs after this fixture)."""
    if request.cls is not None:
        request.cls.artifacts = request.getfixturevalue("artifacts")
