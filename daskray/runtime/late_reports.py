"""Reports a long task would hold back, sent while it runs.

A worker batches its reports to the head and sends them between tasks (see
:mod:`.worker`).  A quick task's finish report may then still wait in the batch
when the next task starts; if that task runs for seconds, so would the report,
and whoever waits for the quick task's result with it.  :class:`LateReports` is
a thread that sends such a batch once its oldest report is ``LATE_SECONDS`` old
while a task is still running.

The head socket is the main thread's; this thread uses it only between
:meth:`LateReports.arm` (a task starts with reports pending) and
:meth:`LateReports.disarm`, which the main thread calls before it touches the
reports or the socket again.  It sends while holding the lock ``disarm`` takes,
so the two never use the socket at once.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

#: how old the oldest pending report may grow while a task runs
LATE_SECONDS = 0.01
#: how often the thread looks at the deadline while tasks keep arming it
TICK_SECONDS = 0.005
#: the thread sleeps until woken after this long without an arm
IDLE_AFTER_SECONDS = 1.0


class LateReports:
    """Sends the worker's pending reports when a running task would hold them back."""

    def __init__(self, send: Callable[[], None]) -> None:
        self._send = send
        self._lock = threading.Condition(threading.Lock())
        #: when to send (a ``perf_counter`` time), while armed; else None
        self._deadline: float | None = None
        self._idle = False  # the thread waits for an arm, without a timeout
        self._stopped = False
        threading.Thread(target=self._run, name="daskray-late-reports", daemon=True).start()

    def arm(self, first_report_at: float) -> None:
        """A task starts while reports from ``first_report_at`` on are pending."""
        with self._lock:
            self._deadline = first_report_at + LATE_SECONDS
            if self._idle:
                self._lock.notify()

    def disarm(self) -> None:
        """The main thread takes the reports and the socket back (waits for a send
        in progress to end)."""
        with self._lock:
            self._deadline = None

    def stop(self) -> None:
        with self._lock:
            self._deadline, self._stopped = None, True
            self._lock.notify()

    def _run(self) -> None:
        """While tasks keep arming it, look every ``TICK_SECONDS`` (a wake-up per
        task would cost the worker a thread switch per task, on a call's critical
        path); after ``IDLE_AFTER_SECONDS`` without an arm, sleep until the next."""
        with self._lock:
            last_armed = time.perf_counter()
            while not self._stopped:
                now = time.perf_counter()
                if self._deadline is None:
                    if now - last_armed > IDLE_AFTER_SECONDS:
                        self._idle = True
                        self._lock.wait()
                        self._idle = False
                    else:
                        self._lock.wait(TICK_SECONDS)
                    continue
                last_armed = now
                delay = self._deadline - now
                if delay > 0:
                    self._lock.wait(min(delay, TICK_SECONDS))
                    continue
                self._deadline = None
                try:
                    self._send()
                except Exception as exc:  # noqa: BLE001 - the main thread sends them later
                    print(f"daskray worker: could not send reports early: {exc}",
                          file=sys.stderr)
