import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# appended, not prepended: `import monet` is the installed package (python/monet needs its built module)
sys.path.append(os.path.join(REPO, "python"))


@pytest.fixture(scope="session")
def monet_bin() -> str:
    path = os.environ.get("MONET_BIN", os.path.join(REPO, "build", "monet"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"monet binary not found at {path}: build first (bash scripts/build.sh) or set MONET_BIN")
    return path


def require(module: str, why: str):
    """Imports an optional test dependency. Missing: the test fails when
    CI is set (CI installs every dependency, so a missing one is a broken
    set-up, never a silent skip) and is skipped with the reason elsewhere."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"{module} is not installed ({why}): {e}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
