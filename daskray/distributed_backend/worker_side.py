"""What runs on the dask workers: the wrapper of every remote call, and the session
the tasks there call through."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import traceback
from typing import Any, Callable, Iterator

from .. import backend
from ..errors import SerializationError, TaskCancelledError
from ..refs import tracker
from .output import call_output
from ..runtime.serialization import (decode_table, dumps_exception, exited_error,
                                     loads_exception)

_lock = threading.Lock()

#: the thread running each remote call in this process, by its dask key
_running: dict[Any, int] = {}
#: the calls interrupted by ``daskray.cancel`` while they ran here, by dask key
_interrupted: set = set()
#: the ObjectRef keys of the calls each running call made, by its dask key: a
#: recursive cancel cancels them too
_started: dict[Any, list] = {}

#: functions of remote calls unpickled in this process, by their table's id
_functions: dict[bytes, Callable] = {}
MAX_CACHED_FUNCTIONS = 512

#: the attribute a call's exception carries its worker-side traceback text in
REMOTE_TRACEBACK = "_daskray_remote_traceback"
#: the attribute a call's error carries, packed, the error its caller is to raise
#: (distributed pickles an exception without its ``__cause__``)
CARRIED_ERROR = "_daskray_error"


#: ``.active`` in a task thread that left its worker's pool (``leave_worker_pool``)
_seceded = threading.local()

#: the session class tasks here call through, set by daskray's worker plugin on each
#: worker (``joining.DaskrayWorkerPlugin``; the class lives above this module)
session_class: Any = None


def task_session() -> Any:
    """The session a task on a dask worker calls through: the driver's when the
    worker runs in the driver's process, else this worker's own, made on first use
    over the worker's client."""
    current = backend.installed()
    if getattr(current, "on_dask", False):
        return current
    with _lock:
        current = backend.installed()
        if getattr(current, "on_dask", False):
            return current
        from distributed import get_client

        if session_class is None:
            raise RuntimeError("daskray's worker plugin has not run on this dask worker: "
                               "call daskray.init(address=...) on the driver first")
        session = session_class(get_client(), in_task=True)
        backend.install(session, in_task=True)
        tracker.reporting = True
        tracker.on_drop = session.forget
        tracker.wake = session.wake
        return session


@contextlib.contextmanager
def leave_worker_pool() -> Iterator[None]:
    """Inside a task on a dask worker: give its thread slot back while this waits (in
    ``get()``, for an actor's reply or constructor), so that the tasks it waits for can
    run there (``secede``; ``rejoin`` afterwards).  Elsewhere (the driver, an actor's
    own threads) and when already left, it does nothing."""
    from distributed.worker import thread_state

    if getattr(_seceded, "active", False) or not hasattr(thread_state, "start_time"):
        yield
        return
    from distributed import rejoin, secede

    try:
        secede()
    except (KeyError, ValueError):  # not a task thread after all
        yield
        return
    _seceded.active = True
    try:
        yield
    finally:
        _seceded.active = False
        rejoin()


def forget_frames(exc: BaseException) -> None:
    """Drop the traceback of ``exc``, an exception this thread handles.  One raised
    through ``client.sync`` stays in a reference cycle (with the asyncio task that
    raised it), and its traceback's frames lead (``f_back``) to the frames of this
    thread's callers: until Python's next cycle collection those would keep their
    values alive -- a call's arguments, ObjectRefs and actor handles among them, and
    with them the objects and actors they name."""
    exc.__traceback__ = None


class CallArguments:
    """A call's arguments as the user gave them, opaque to distributed (which would
    take any ObjectRef, even one nested in a list, for a future to resolve): the
    top-level refs' places are ``slots``, their values come as the task's own
    arguments."""

    __slots__ = ("args", "kwargs", "slots")

    def __init__(self, args: tuple, kwargs: dict, slots: tuple) -> None:
        self.args = args
        self.kwargs = kwargs
        #: (position or keyword, ...) in the order of the values passed
        self.slots = slots

    def __getstate__(self) -> tuple:
        return self.args, self.kwargs, self.slots

    def __setstate__(self, state: tuple) -> None:
        self.args, self.kwargs, self.slots = state

    def filled(self, values: tuple) -> tuple[list, dict]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot, value in zip(self.slots, values):
            if type(slot) is int:
                args[slot] = value
            else:
                kwargs[slot] = value
        return args, kwargs


def function_of(table_id: bytes, table: bytes) -> Callable:
    """The function of a remote call, unpickled once per process: its table (daskray's
    own pickle of it, keeping the user's file names for tracebacks) and the table's id."""
    func = _functions.get(table_id)
    if func is None:
        func = decode_table(table)[0]
        with _lock:
            if len(_functions) >= MAX_CACHED_FUNCTIONS:
                _functions.pop(next(iter(_functions)))
            _functions[table_id] = func
    return func


def run_call(table_id: bytes, table: bytes, exception_retries: int, call: CallArguments,
             *values: Any) -> Any:
    """Run one remote call on a dask worker: its top-level ObjectRefs arrive as
    ``values`` (distributed resolved them), nested ones as refs.  With
    ``retry_exceptions`` an exception re-runs the call here, ``exception_retries``
    times at most."""
    func = function_of(table_id, table)
    args, kwargs = call.filled(values)
    session = task_session()
    key = task_key()
    with _lock:
        _running[key] = threading.get_ident()
    interrupted = False
    try:
        try:
            with call_output(getattr(func, "__name__", "task")):
                result = _run(session, func, exception_retries, args, kwargs)
        finally:
            with _lock:  # an interruption is only ever aimed at a registered call
                _running.pop(key, None)
                _started.pop(key, None)
                interrupted = key in _interrupted
                _interrupted.discard(key)
    except KeyboardInterrupt:  # the interruption arrives at the latest here
        if interrupted or key in _interrupted:
            raise TaskCancelledError(f"task {key!r} was cancelled while running") from None
        raise
    if interrupted:  # it caught the KeyboardInterrupt: cancelled all the same
        raise TaskCancelledError(f"task {key!r} was cancelled while running")
    return result


def _run(session: Any, func: Callable, exception_retries: int, args: list,
         kwargs: dict) -> Any:
    since = session.table.announced
    session.table.sync_with_tracker()
    attempt = 0
    while True:
        try:
            result = func(*args, **kwargs)
            if inspect.iscoroutine(result):
                result = asyncio.run(result)
            break
        except SystemExit as exc:  # sys.exit(): the worker must live on
            raise _exited(exc) from None
        except Exception as exc:
            if attempt >= exception_retries:
                # the traceback as it is here, with the user's file and line; the one
                # distributed rebuilds in the driver may not have them
                exc.__dict__[REMOTE_TRACEBACK] = traceback.format_exc()
                raise
            attempt += 1
    session.settle_received(since)
    return result


def _exited(exc: BaseException) -> Exception:
    """The error a call that raised ``exc`` (``sys.exit()``) fails with: a TaskError
    naming it, carrying ``exc`` packed by daskray (distributed would lose its
    ``__cause__`` and its exit code) for the caller to unpack (``carried_error``)."""
    key = task_key()
    error = exited_error(exc, key, traceback.format_exc())
    error.__dict__[CARRIED_ERROR] = dumps_exception(exc, key)
    error.__cause__ = None
    return error


def carries_error(exc: BaseException) -> bool:
    """Whether ``exc`` carries the error its caller is to raise (``carried_error``)."""
    return CARRIED_ERROR in getattr(exc, "__dict__", {})


def carried_error(exc: BaseException) -> BaseException | None:
    """The error the caller of a call that failed with ``exc`` is to raise, when
    ``exc`` carries one (see ``_exited``); its ``__cause__`` is set."""
    blob = exc.__dict__.get(CARRIED_ERROR) if hasattr(exc, "__dict__") else None
    return None if blob is None else loads_exception(blob)


def task_key() -> Any:
    from distributed.worker import thread_state

    return getattr(thread_state, "key", None)


def note_started(keys: list) -> None:
    """In a call's thread: the call made the calls of these ObjectRef keys."""
    key = task_key()
    if key is not None:
        with _lock:
            if key in _running:
                _started.setdefault(key, []).extend(keys)


def interrupt_calls(keys: list, recursive: bool = True) -> list:
    """On a dask worker: raise KeyboardInterrupt (as Ray's cancel does) in the
    threads running these calls (``daskray.cancel``); their callers get
    TaskCancelledError.  Python code stops at its next line; a call blocked inside C
    (a sleep, a read) stops when that returns.  With ``recursive``, the calls they
    started are cancelled too, from a thread of their own (the caller of this may be
    the worker's event loop).  The keys interrupted here."""
    import ctypes

    hit, started = [], []
    with _lock:
        for key in keys:
            ident = _running.get(key)
            if ident is not None and key not in _interrupted:
                _interrupted.add(key)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))
                hit.append(key)
                if recursive:
                    started.extend(_started.get(key, ()))
    if started:
        threading.Thread(target=_cancel_started, args=(started,), daemon=True,
                         name="daskray-cancel").start()
    return hit


def _cancel_started(keys: list) -> None:
    """Cancel, recursively, the calls a cancelled call made."""
    session = backend.installed()
    if getattr(session, "on_dask", False):
        session.cancel_keys(keys, recursive=True)


def unpicklable(what: str, cause: BaseException, where: str = "task") -> SerializationError:
    """The error for a value that cannot be sent to the dask workers: ``what`` names
    it, ``cause`` is pickle's complaint, ``where`` what should make it instead."""
    return SerializationError(
        f"{what} cannot be pickled: {cause}. Values are sent to the dask workers, so "
        "they must be picklable (open files, locks, sockets and generators are not); "
        f"create such objects inside the {where}.")


def nth_return(value: Any, index: int, count: int, name: str) -> Any:
    """The ``index``-th of a ``num_returns=count`` call's values."""
    try:
        n = len(value)
    except TypeError:
        n = -1
    if n != count:
        raise ValueError(
            f"task {name} was declared with num_returns={count} but returned "
            f"{'a ' + type(value).__name__ if n < 0 else f'{n} values'}")
    return value[index]
