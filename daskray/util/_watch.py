"""``RefWatcher``: call a function when an ObjectRef's task has finished.

The public API has no completion callbacks (``get`` and ``wait`` block), but
joblib's backends and ``multiprocessing.Pool``'s results are driven by them:
joblib dispatches its next batch from the callback of the previous one, and a
Pool hands a freed process its next chunk.  One thread per watcher waits for the
refs it was given and calls their functions, in that thread, as they finish.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import daskray

log = logging.getLogger(__name__)

#: how long one ``wait`` lasts before the thread looks for refs added meanwhile (s)
POLL = 0.05


class RefWatcher:
    """Calls ``on_done(ref)`` once ``ref``'s task has finished (its value or its
    error is there), in the watcher's thread.  The thread runs only while there
    is something to watch: an idle watcher holds nothing alive."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._watched: dict[daskray.ObjectRef, Callable[[daskray.ObjectRef], None]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, ref: daskray.ObjectRef, on_done: Callable[[daskray.ObjectRef], None]) -> None:
        """Call ``on_done(ref)`` when ``ref`` is ready.  Safe from any thread,
        also from an ``on_done`` function."""
        with self._lock:
            self._watched[ref] = on_done
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def forget(self, refs: list) -> None:
        """Stop watching ``refs``: their functions are not called."""
        with self._lock:
            for ref in refs:
                self._watched.pop(ref, None)

    def watching(self) -> list:
        """The refs not finished yet."""
        with self._lock:
            return list(self._watched)

    def _run(self) -> None:
        while True:
            with self._lock:
                refs = list(self._watched)
                if not refs:
                    self._thread = None
                    return
            try:
                # a ref watched meanwhile joins the next wait, after at most POLL s
                ready, _ = daskray.wait(refs, num_returns=1, timeout=POLL)
            except BaseException:  # the cluster is gone: each get says why
                log.debug("waiting for %d refs failed; calling them all", len(refs),
                          exc_info=True)
                ready = refs
            for ref in ready:
                self._call(ref)

    def _call(self, ref: daskray.ObjectRef) -> None:
        with self._lock:
            on_done = self._watched.pop(ref, None)
        if on_done is None:
            return
        try:
            on_done(ref)
        except Exception:  # one failing callback must not stop the others
            log.exception("a completion callback of %s failed", self._name)
