import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "python"))


@pytest.fixture(scope="session")
def monet_bin() -> str:
    path = os.environ.get("MONET_BIN", os.path.join(REPO, "build", "monet"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"monet binary not found at {path}: build first (bash scripts/build.sh) or set MONET_BIN")
    return path
