"""A request run by tests/restart_oracle_worker.py in a process of its own, so that a crash of the machine fails the test instead of ending pytest."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "restart_oracle_worker.py"
WORKER_TIMEOUT = 900            # seconds: a hang fails the case too


def in_own_process(**request) -> dict:
    """tests/restart_oracle_worker.py's answer to `request`: the run's document. A crash of the
    machine fails the test with the signal and the end of the worker's standard error."""
    worker = subprocess.run([sys.executable, "-X", "faulthandler", str(WORKER), json.dumps(request)],
                            capture_output=True, text=True,
                            timeout=WORKER_TIMEOUT)
    if worker.returncode < 0:
        pytest.fail(f"the machine's process died by signal {-worker.returncode} ({request}):\n{worker.stderr[-2000:]}")
    assert worker.returncode == 0, f"the worker failed ({request}):\n{worker.stderr[-4000:]}"
    return json.loads(worker.stdout)
