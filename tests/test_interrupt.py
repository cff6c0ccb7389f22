"""xmei.interrupt in this process: the first signal asks, a second or the grace's end raises, the
handlers are put back. (What the commands do with it: test_extract.py, test_faults_runs.py.)"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from xmei.interrupt import Interrupted, stop_on_signals

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signal handlers can only be set in the main thread")


def test_the_first_signal_asks_and_check_stops_at_the_safe_point():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(grace_s=30) as stop:
        assert not stop.requested
        stop.check("never raised before a signal")
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM  # the work goes on to its safe point
        with pytest.raises(Interrupted) as stopped:
            stop.check("stopped after shard 3")
    assert str(stopped.value) == "SIGTERM: stopped after shard 3" and stopped.value.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) == before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_second_signal_stops_at_once_and_later_ones_are_ignored():
    with pytest.raises(Interrupted) as stopped, stop_on_signals(grace_s=30):
        os.kill(os.getpid(), signal.SIGINT)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # never reached
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # while cleaning up: ignored
    assert "stopped at once by a second signal (SIGINT)" in str(stopped.value)
    assert stopped.value.exit_status == 130


def test_the_work_in_progress_is_abandoned_when_the_grace_runs_out():
    start = time.monotonic()
    with pytest.raises(Interrupted) as stopped, stop_on_signals(grace_s=0.2):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # a shard that does not finish in time
    assert "no safe point was reached within 0.2 s" in str(stopped.value) and time.monotonic() - start < 3
