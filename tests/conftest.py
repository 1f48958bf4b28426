"""Test-session settings that must be in place before torch, prefect or mlflow are imported."""

import os
import shutil
import tempfile

# Sleeping (not spinning) OpenMP threads: on a busy 2-core machine spinning threads slow every
# process down 5-20x (docs/PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# One Prefect home for the whole session (profiles, the SQLite database of a server a test
# starts), never ~/.prefect; removed when the session ends. No telemetry from any tool.
PREFECT_HOME = tempfile.mkdtemp(prefix="tdm-prefect-home-")
os.environ["PREFECT_HOME"] = PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"


def pytest_unconfigure(config):
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)
