"""service/priority.py: the worker's lower CPU priority holds against processes of other sessions too.

Each case runs in a child interpreter: niceness cannot be taken back, and the test process must not keep it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="Linux autogroup scheduling only")

PROBE = "from service import priority; import os; print(priority.lower(7), os.nice(0), open('/proc/self/autogroup').read().split()[-1])"


def _lowered(*, own_session: bool) -> list[str]:
    """What the child printed: whether its session was niced, its own niceness, its session's niceness."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60,
                          start_new_session=own_session, cwd=Path(__file__).parent.parent)
    return done.stdout.split()


def test_a_worker_that_leads_its_session_lowers_the_sessions_priority_with_its_own() -> None:
    assert _lowered(own_session=True) == ["True", str(min(19, os.nice(0) + 7)), "7"]


def test_a_worker_in_a_shared_session_lowers_only_its_own_priority() -> None:
    session_nice = Path("/proc/self/autogroup").read_text().split()[-1]
    assert _lowered(own_session=False) == ["False", str(min(19, os.nice(0) + 7)), session_nice]
