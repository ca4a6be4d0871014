"""SIGTERM (preemption) and SIGINT (Ctrl-C): finish the step, save, and stop with a status a scheduler can read.

The handlers only record the signal, so no ``KeyboardInterrupt`` is raised inside JAX callbacks (where it would
be printed and swallowed). A second Ctrl-C exits at once, without saving (the last finished checkpoint stays
valid: orbax writes to a temporary folder first). ``train.py`` exits ``128 + signal``: 143 for SIGTERM, 130 for
SIGINT.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


class Preempted(Exception):  # noqa: N818 (not an error: the run was asked to stop)
    """The run stopped on a signal after saving ``step``."""

    def __init__(self, step: int, signum: int, saved: bool):
        self.step, self.signum, self.saved = step, signum, saved
        self.exit_code = 128 + signum
        what = "saved" if saved else "nothing new to save"
        super().__init__(f"{signal.Signals(signum).name}: preempted at step {step}; {what}")


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGINT set :attr:`signum` instead of killing the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            print("second interrupt: exiting without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        return False
