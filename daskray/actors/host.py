"""The actor side of an actor process: the one instance, and how calls reach it.

An actor process is a worker started for one actor.  Its first task is the
constructor (:class:`ActorInit`), which makes the instance; every later task is
a method call (:class:`ActorCall`).  Calls arrive in submission order and run one
at a time.  ``async def`` methods run to completion on an event loop owned by
the process.
"""

from __future__ import annotations

import inspect
import threading
import traceback
from typing import Any

from ..errors import ActorError
from ..remote_function import RemoteFunction

#: the instance this process hosts, once its constructor has run
instance: Any = None
#: the traceback of the constructor, when it raised
init_failure: str | None = None
_loop: Any = None  # an asyncio event loop, made on first use


class ActorInit:
    """Task body of an actor's constructor: build the instance in this process."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        global instance, init_failure
        instance = None
        try:
            instance = self.cls(*args, **kwargs)
        except BaseException as exc:
            init_failure = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            raise
        init_failure = None


class ActorCall:
    """Task body of a method call: run ``method`` on the instance."""

    __slots__ = ("cls_name", "method")

    def __init__(self, cls_name: str, method: str) -> None:
        self.cls_name = cls_name
        self.method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if instance is None:
            raise ActorError(
                f"actor {self.cls_name} cannot run {self.method}(): its constructor "
                f"raised.\nThe constructor's traceback:\n{init_failure or '(not available)'}")
        attr = inspect.getattr_static(instance, self.method)
        if isinstance(attr, RemoteFunction):  # marked @daskray.remote in a daskray.Actor
            result = attr.__wrapped__(instance, *args, **kwargs)
        else:
            result = getattr(instance, self.method)(*args, **kwargs)
        if inspect.iscoroutine(result):
            result = _run(result)
        return result


_loop_lock = threading.Lock()


def _run(coro: Any) -> Any:
    """Run a coroutine on the actor's event loop (a thread of its own), so the
    coroutines of concurrent calls interleave on one loop; wait for its result."""
    import asyncio

    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="daskray-actor-loop",
                             daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coro, _loop).result()
