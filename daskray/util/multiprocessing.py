"""``Pool``: the standard library's ``multiprocessing.Pool`` on a daskray cluster.

>>> from daskray.util.multiprocessing import Pool          # doctest: +SKIP
>>> with Pool(4, initializer=setup, initargs=(path,)) as pool:   # doctest: +SKIP
...     pool.map(f, range(100))

As in Ray's ``ray.util.multiprocessing``, the pool's processes are actors: each runs
``initializer(*initargs)`` once, when it starts, then the chunks of work the pool
hands it, one at a time; a process that is free takes the next chunk waiting, as
the standard library's workers do.  Results, timeouts and errors are the standard
library's: ``get`` raises the task's own exception (with the remote traceback as its
``__cause__``) and ``multiprocessing.TimeoutError`` past its timeout.

What differs: ``terminate()`` (also at the end of a ``with`` block) makes the
results it cut short raise ``ActorDiedError`` instead of never becoming ready; a
process that dies in a task is replaced (``initializer`` runs again) and that
task's result raises ``ActorDiedError``, where the standard library's never comes;
``maxtasksperchild`` is refused, and ``context`` is accepted and has no effect.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from multiprocessing import TimeoutError
from typing import Any, Callable, Iterable, Iterator

import daskray

from ._watch import RefWatcher

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator", "TimeoutError"]

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"


class _PoolProcess:
    """One of the pool's processes (an actor): runs the initializer, then chunks."""

    def __init__(self, initializer: Callable | None, initargs: tuple) -> None:
        #: the initializer's error, raised by ready(): as the error of a call it
        #: reaches the caller as its own type, not as a failed constructor
        self._failed: Exception | None = None
        if initializer is not None:
            try:
                initializer(*initargs)
            except Exception as error:
                self._failed = error

    def ready(self) -> bool:
        """Whether the initializer ran; its own exception if it raised."""
        if self._failed is not None:
            raise self._failed
        return True

    def run(self, func: Callable, chunk: list, star: bool) -> list:
        """``func`` over one chunk of inputs, in order; the first error ends the chunk."""
        if star:
            return [func(*args) for args in chunk]
        return [func(x) for x in chunk]


class _Work:
    """One chunk waiting for a process: what to run and where its outcome goes."""

    __slots__ = ("func", "chunk", "star", "result", "index")

    def __init__(self, func: Callable, chunk: list, star: bool, result: "_Result",
                 index: int) -> None:
        self.func, self.chunk, self.star = func, chunk, star
        self.result, self.index = result, index


class _Result:
    """What the pool's results share: the outcomes of their chunks, as they come."""

    def __init__(self) -> None:
        self._cond = threading.Condition()

    def _set(self, index: int, success: bool, value: Any) -> None:
        """Chunk ``index`` finished: ``value`` is its list of results, or its error."""
        raise NotImplementedError

    def _abandon(self, error: BaseException) -> None:
        """The pool was terminated: whatever did not come yet raises ``error``."""
        raise NotImplementedError


class ApplyResult(_Result):
    """The standard library's ``AsyncResult`` (``apply_async``, ``map_async``, ...)."""

    def __init__(self, callback: Callable | None = None,
                 error_callback: Callable | None = None) -> None:
        super().__init__()
        self._callback = callback
        self._error_callback = error_callback
        self._ready = False
        self._settled = False
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._ready

    def successful(self) -> bool:
        if not self._ready:
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._ready, timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The result; the task's own exception if it raised; ``TimeoutError``
        when it is not there within ``timeout`` seconds."""
        self.wait(timeout)
        if not self._ready:
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, index: int, success: bool, value: Any) -> None:
        self._finish(success, value[0] if success else value)

    def _finish(self, success: bool, value: Any, callbacks: bool = True) -> None:
        with self._cond:
            if self._settled:  # terminate() and the last chunk may race: the first wins
                return
            self._settled = True
            self._success, self._value = success, value
        if callbacks:
            call = self._callback if success else self._error_callback
            if call is not None:
                call(value)
        with self._cond:
            self._ready = True
            self._cond.notify_all()

    def _abandon(self, error: BaseException) -> None:
        self._finish(False, error, callbacks=False)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """``map_async``'s result: ready once every chunk came; the first error wins."""

    def __init__(self, chunksize: int, length: int, callback: Callable | None,
                 error_callback: Callable | None) -> None:
        super().__init__(callback, error_callback)
        self._chunksize = chunksize
        self._values: list = [None] * length
        self._left = -(-length // chunksize) if chunksize > 0 else 0
        self._error: BaseException | None = None
        if self._left == 0:  # nothing to run: ready at once, no callback (as the stdlib)
            self._finish(True, [], callbacks=False)

    def _set(self, index: int, success: bool, value: Any) -> None:
        with self._cond:
            self._left -= 1
            if success:
                self._values[index * self._chunksize:(index + 1) * self._chunksize] = value
            elif self._error is None:
                self._error = value
            done = self._left == 0
        if done:
            self._finish(self._error is None,
                         self._values if self._error is None else self._error)


class IMapIterator(_Result):
    """``imap``'s iterator: results in input order, each error raised at its place."""

    def __init__(self, chunks: int) -> None:
        super().__init__()
        self._chunks = chunks
        self._outcomes: dict[int, tuple[bool, Any]] = {}
        self._next = 0
        self._error: BaseException | None = None  # set by terminate

    def __iter__(self) -> "IMapIterator":
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; ``TimeoutError`` when it is not there in ``timeout`` s."""
        with self._cond:
            if not self._cond.wait_for(self._has_next, timeout):
                raise TimeoutError
            success, value = self._take()
        if success:
            return value
        raise value

    def _has_next(self) -> bool:
        return self._next >= self._chunks or self._next in self._outcomes \
            or self._error is not None

    def _take(self) -> tuple[bool, Any]:
        if self._next >= self._chunks:
            raise StopIteration
        outcome = self._outcomes.pop(self._next, None)
        if outcome is None:  # terminated
            outcome = (False, self._error)
        self._next += 1
        return outcome

    def _set(self, index: int, success: bool, value: Any) -> None:
        with self._cond:
            self._outcomes[index] = (success, value)
            self._cond.notify_all()

    def _abandon(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()


class IMapUnorderedIterator(IMapIterator):
    """``imap_unordered``'s iterator: results as they finish."""

    def __init__(self, chunks: int) -> None:
        super().__init__(chunks)
        self._arrived: deque = deque()

    def _has_next(self) -> bool:
        return self._next >= self._chunks or bool(self._arrived) or self._error is not None

    def _take(self) -> tuple[bool, Any]:
        if self._next >= self._chunks:
            raise StopIteration
        outcome = self._arrived.popleft() if self._arrived else (False, self._error)
        self._next += 1
        return outcome

    def _set(self, index: int, success: bool, value: Any) -> None:
        with self._cond:
            self._arrived.append((success, value))
            self._cond.notify_all()


class _Single:
    """Adapts a chunk outcome of one item to that item (``imap`` with chunksize 1)."""

    def __init__(self, result: _Result) -> None:
        self.result = result

    def _set(self, index: int, success: bool, value: Any) -> None:
        self.result._set(index, success, value[0] if success else value)

    def _abandon(self, error: BaseException) -> None:
        self.result._abandon(error)


class Pool:
    """``multiprocessing.Pool`` with ``processes`` actors as its processes.

    ``processes`` defaults to the cluster's CPUs (``daskray.cluster_resources()``);
    ``remote_args`` (or Ray's ``ray_remote_args``) are options of those actors, e.g.
    ``{"num_cpus": 1}``.  ``Pool()`` returns once every process ran its initializer,
    and raises the initializer's own exception if it failed.
    """

    def __init__(self, processes: int | None = None, initializer: Callable | None = None,
                 initargs: Iterable = (), maxtasksperchild: int | None = None,
                 context: Any = None, remote_args: dict | None = None,
                 ray_remote_args: dict | None = None) -> None:
        if processes is None:
            processes = max(int(daskray.cluster_resources().get("CPU", 1)), 1)
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None:
            raise ValueError("daskray's Pool does not replace its processes after a number "
                             "of tasks (maxtasksperchild): leave it None")
        self._processes = _start_processes(processes, initializer, tuple(initargs),
                                           remote_args or ray_remote_args or {})
        self._lock = threading.Condition()
        self._state = RUN
        self._idle = deque(self._processes)
        self._waiting: deque[_Work] = deque()
        self._running: dict[daskray.ObjectRef, tuple[Any, _Work]] = {}
        self._killed_calls: list = []
        self._watcher = RefWatcher("daskray-pool")

    # ------------------------------------------------------------ the standard library's API

    def apply(self, func: Callable, args: tuple = (), kwds: dict | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: tuple = (), kwds: dict | None = None,
                    callback: Callable | None = None,
                    error_callback: Callable | None = None) -> ApplyResult:
        self._check_running()
        result = ApplyResult(callback, error_callback)
        call = functools.partial(func, **kwds) if kwds else func
        self._submit([_Work(call, [tuple(args)], True, result, 0)])
        return result

    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        return self._map_async(func, iterable, False, chunksize).get()

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                  callback: Callable | None = None,
                  error_callback: Callable | None = None) -> MapResult:
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        return self._map_async(func, iterable, True, chunksize).get()

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                      callback: Callable | None = None,
                      error_callback: Callable | None = None) -> MapResult:
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> Iterator:
        return self._imap(IMapIterator, func, iterable, chunksize)

    def imap_unordered(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> Iterator:
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize)

    def close(self) -> None:
        """No more work is taken; what was given still runs (``join`` waits for it)."""
        with self._lock:
            if self._state == RUN:
                self._state = CLOSE

    def terminate(self) -> None:
        """Stop now: work not started is dropped, running work is stopped with its
        processes, and the results it cut short raise ``ActorDiedError``."""
        with self._lock:
            if self._state == TERMINATE:
                return
            self._state = TERMINATE
            cut = list(self._waiting) + [work for _, work in self._running.values()]
            self._killed_calls = list(self._running)
            self._waiting.clear()
            self._running.clear()
            self._lock.notify_all()
        self._watcher.forget(self._killed_calls)
        self._stop_processes()
        error = daskray.ActorDiedError(
            "the pool was terminated before this task finished: it was stopped or never "
            "started; its result will not come")
        for work in cut:
            work.result._abandon(error)

    def join(self) -> None:
        """Wait until the work given to a closed pool is done and its processes ended
        (after ``terminate``: until the processes stopped)."""
        with self._lock:
            if self._state == RUN:
                raise ValueError("Pool is still running")
            self._lock.wait_for(lambda: not self._waiting and not self._running)
            state = self._state
        if state == CLOSE:
            self._stop_processes()
        elif self._killed_calls:  # a killed process's calls end with it
            daskray.wait(self._killed_calls, num_returns=len(self._killed_calls))

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __reduce__(self) -> tuple:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __repr__(self) -> str:
        return f"<daskray.util.multiprocessing.Pool state={self._state} " \
               f"pool_size={len(self._processes)}>"

    # ------------------------------------------------------------ dispatching chunks

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _map_async(self, func: Callable, iterable: Iterable, star: bool,
                   chunksize: int | None, callback: Callable | None = None,
                   error_callback: Callable | None = None) -> MapResult:
        self._check_running()
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), len(self._processes) * 4)
            chunksize += bool(extra)
        if not items:
            chunksize = 0
        result = MapResult(chunksize, len(items), callback, error_callback)
        self._submit(_chunked(func, items, chunksize, star, result))
        return result

    def _imap(self, kind: type, func: Callable, iterable: Iterable, chunksize: int) -> Iterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        items = list(iterable)
        result = kind(-(-len(items) // chunksize))
        if chunksize == 1:  # one item per chunk: the iterator yields items
            self._submit(_chunked(func, items, 1, False, _Single(result)))
            return result
        self._submit(_chunked(func, items, chunksize, False, result))
        return (item for chunk in result for item in chunk)

    def _submit(self, work: list[_Work]) -> None:
        with self._lock:
            self._waiting.extend(work)
            refused = self._dispatch()
        _deliver_errors(refused)

    def _dispatch(self) -> list[tuple[_Work, Exception]]:
        """Give waiting chunks to idle processes (with the lock held); the chunks
        that could not be sent (e.g. an unpicklable function), with the error."""
        refused = []
        while self._idle and self._waiting:
            process, work = self._idle.popleft(), self._waiting.popleft()
            try:
                ref = process.run.remote(work.func, work.chunk, work.star)
            except Exception as error:
                self._idle.appendleft(process)
                refused.append((work, error))
                continue
            self._running[ref] = (process, work)
            self._watcher.watch(ref, self._finished)
        if refused:
            self._lock.notify_all()
        return refused

    def _finished(self, ref: daskray.ObjectRef) -> None:
        """A chunk is done (in the watcher's thread): its process takes the next."""
        try:
            outcome = (True, daskray.get(ref))
        except Exception as error:
            outcome = (False, error)
        with self._lock:
            entry = self._running.pop(ref, None)
            if entry is None:  # terminated meanwhile
                return
            process, work = entry
            self._idle.append(process)
            refused = self._dispatch()
            self._lock.notify_all()
        work.result._set(work.index, *outcome)
        _deliver_errors(refused)

    def _stop_processes(self) -> None:
        for process in self._processes:
            try:
                daskray.kill(process)
            except daskray.DaskrayError:  # gone already
                pass


def _deliver_errors(refused: list[tuple[_Work, Exception]]) -> None:
    for work, error in refused:
        work.result._set(work.index, False, error)


def _chunked(func: Callable, items: list, chunksize: int, star: bool,
             result: Any) -> list[_Work]:
    if not items:
        return []
    return [_Work(func, items[start:start + chunksize], star, result, index)
            for index, start in enumerate(range(0, len(items), chunksize))]


def _start_processes(count: int, initializer: Callable | None, initargs: tuple,
                     remote_args: dict) -> list:
    """``count`` pool processes whose initializer ran; its own error if it failed."""
    process = daskray.remote(_PoolProcess).options(max_restarts=-1, **remote_args)
    processes = [process.remote(initializer, initargs) for _ in range(count)]
    try:
        daskray.get([p.ready.remote() for p in processes])
    except BaseException:
        for p in processes:
            daskray.kill(p)
        raise
    return processes
