"""dask's local-scheduler callbacks (``dask.callbacks.Callback``: ``ProgressBar``,
``Profiler``, ...) around a graph that runs elsewhere: the part both backends share.

::

    with CallbackRun(graph, callbacks) as run:
        ...                                  # check the graph
        if run.active:
            run.begin(state)                 # dask's state dict, made by the caller
        ...                                  # run; call run.pretask / run.posttask per task
        run.succeeded = True

``start`` callbacks run on entry, ``start_state`` in :meth:`begin`, ``finish`` on exit
for every callback whose ``start`` ran, told whether the run failed.
"""

from __future__ import annotations

from typing import Any

from dask.callbacks import local_callbacks, unpack_callbacks


class CallbackRun:
    """The callbacks of one ``get``, in the order dask's own schedulers call them."""

    def __init__(self, graph: Any, callbacks: Any = None) -> None:
        self.graph = graph
        self._scope = local_callbacks(callbacks)
        self.callbacks: list = []
        self.pretask: list = []
        self.posttask: list = []
        self.state: dict = {}
        self.succeeded = False
        self._started: list = []

    @property
    def active(self) -> bool:
        """Whether any callback is active (then a ``state`` dict is wanted)."""
        return bool(self.callbacks)

    @property
    def per_task(self) -> bool:
        """Whether a callback wants to hear of each task."""
        return bool(self.pretask or self.posttask)

    def __enter__(self) -> "CallbackRun":
        self.callbacks = self._scope.__enter__()
        try:
            _, _, self.pretask, self.posttask, _ = unpack_callbacks(self.callbacks)
            for cb in self.callbacks:
                if cb[0]:
                    cb[0](self.graph)
                self._started.append(cb)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def begin(self, state: dict) -> None:
        """The run's ``state`` is made: ``start_state`` callbacks see it."""
        self.state = state
        for cb in self.callbacks:
            if cb[1]:
                cb[1](self.graph, state)

    def __exit__(self, *exc: Any) -> None:
        try:
            for cb in self._started:
                if cb[4]:
                    cb[4](self.graph, self.state, not self.succeeded)
        finally:
            self._scope.__exit__(*exc)
