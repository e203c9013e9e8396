"""service/priority.py: the worker's lower CPU priority holds against processes of other sessions too.

The cases that really lower a priority run in a child interpreter: niceness cannot be taken back, and the
test process must not keep it. The kernel's refusals are played by a stand-in for the autogroup file.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.infra import priority

AUTOGROUP = priority.AUTOGROUP
ROOT = Path(__file__).parent.parent
needs_autogroup = pytest.mark.skipif(not AUTOGROUP.exists() or not AUTOGROUP.read_text().split(),
                                reason="Linux autogroup scheduling only")

PROBE = "from service.infra import priority; import os; print(priority.lower(7), os.nice(0), open('/proc/self/autogroup').read().split()[-1])"


def _lowered(*, own_session: bool) -> list[str]:
    """What the child printed: whether its session's niceness was written, its own niceness, its session's."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60,
                          start_new_session=own_session, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.stdout.split()


@needs_autogroup
def test_a_worker_that_leads_its_session_lowers_the_sessions_priority_with_its_own() -> None:
    assert _lowered(own_session=True) == ["True", str(min(19, os.nice(0) + 7)), "7"]


@needs_autogroup
def test_a_worker_in_a_shared_session_lowers_only_its_own_priority() -> None:
    session_nice = AUTOGROUP.read_text().split()[-1]
    assert _lowered(own_session=False) == ["False", str(min(19, os.nice(0) + 7)), session_nice]


class _Refusing:
    """An autogroup file that refuses the first writes with EAGAIN, as the kernel does within 100 ms of another."""

    def __init__(self, refusals: int) -> None:
        self.refusals, self.written = refusals, []

    def write_text(self, text: str) -> None:
        if self.refusals:
            self.refusals -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.written.append(text)


@pytest.fixture
def leader(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a session leader whose own niceness does not change."""
    monkeypatch.setattr(priority.os, "nice", lambda _: 0)
    monkeypatch.setattr(priority.os, "getsid", lambda _: os.getpid())
    monkeypatch.setattr(priority.time, "sleep", lambda _: None)


def test_the_sessions_niceness_is_written_again_when_the_kernel_asks_to_wait(leader, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    autogroup = _Refusing(2)
    monkeypatch.setattr(priority, "AUTOGROUP", autogroup)
    assert priority.lower(10) is True
    assert autogroup.written == ["10"]


def test_the_niceness_alone_applies_when_the_kernel_keeps_refusing(leader, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    autogroup = _Refusing(priority.ATTEMPTS)
    monkeypatch.setattr(priority, "AUTOGROUP", autogroup)
    assert priority.lower(10) is False
    assert autogroup.written == []
