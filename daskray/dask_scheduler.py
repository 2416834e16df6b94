"""``daskray.get`` for dask graphs: dask's scheduler contract on a daskray cluster.

One call = one graph message to the head, then results (and, when dask callbacks
are active, task start/finish notices) stream back on the caller's own queue.
The caller's thread runs the callbacks, as dask's local schedulers do, with a
``state`` dict kept in dask's own shape (``dask.local.start_state_from_dask``,
``finish_task``), so ``ProgressBar``, ``Profiler`` and friends work unchanged.

Choices where dask's contract is silent:

* ``posttask`` callbacks receive the task's real value.  To make that possible a
  graph run with callbacks sends every result to the driver -- a diagnostics
  mode, slower for large intermediates.
* ``Alias`` nodes never run on the cluster (an alias *is* its target); for
  callbacks they start and finish right after their target.
* ``num_workers``, ``pool`` and any other keyword dask or a user passes are
  accepted and ignored: the cluster's size was fixed at ``daskray.init``.
* A worker that dies does not fail the graph, as with dask.distributed: what
  it was running runs again elsewhere (``allowed_failures`` times at most), and
  results only it held are computed again from their inputs (lineage).
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask.config
from dask.local import finish_task, start_state_from_dask
from dask.utils import key_split

from . import backend, errors
from .dask_callbacks import CallbackRun
from .refs import ObjectRef
from .dask_graph import GraphSpec, build_graph, convert, flatten_keys, persist_plan
from .runtime import protocol as P
from .runtime.client import Client
from .runtime import gc_tuning, shared_memory
from .runtime.serialization import dumps_frames, frames_nbytes, loads, table_id
from .runtime.session import error_of

POLL_SECONDS = 0.1


def get(client: Client, dsk: Any, keys: Any, cache: Any = None, callbacks: Any = None,
        **kwargs: Any) -> Any:
    """Compute ``keys`` of ``dsk`` on the cluster behind ``client``."""
    with gc_tuning.paused():  # building allocates, frees nothing (see gc_tuning)
        graph = convert(dsk, cache)
    with CallbackRun(graph, callbacks) as run:
        with gc_tuning.paused():
            spec = build_graph(graph, keys, cache)
        state: dict = {}
        if run.active:
            # the ObjectRefs the graph reads are there from the start, as data is
            known = {**(cache or {}),
                     **{spec.keys[n]: ObjectRef(r) for n, r in spec.external.items()}}
            state = start_state_from_dask(graph, cache=known, sortkey=_priority_of(spec).get,
                                          keys=flatten_keys(keys))
            run.begin(state)
        values = _run(client, spec, state, run.pretask, run.posttask, run.per_task)
        run.succeeded = True
        return _pack(spec.outputs, values)


def _priority_of(spec: GraphSpec) -> dict:
    prio = dict(zip(spec.keys, spec.priorities))
    for alias, node in spec.aliases.items():
        prio.setdefault(alias, spec.priorities[node])
    return prio


def _pack(outputs: Any, values: dict[int, Any]) -> Any:
    """``nested_get``: the requested structure, lists turned into tuples."""
    if isinstance(outputs, list):
        return tuple(_pack(o, values) for o in outputs)
    return values[outputs]


def _run(client: Client, spec: GraphSpec, state: dict, pretask: list, posttask: list,
         notify: bool) -> dict[int, Any]:
    values: dict[int, Any] = dict(spec.local_values)
    outputs = {n for n in flatten_keys(spec.outputs) if n not in values}
    refs_wanted = [n for n in outputs if n in spec.external]
    wanted = sorted(outputs.difference(refs_wanted))
    if wanted:
        _run_on_cluster(client, spec, state, pretask, posttask, notify, wanted, values)
    if refs_wanted:
        keep = [ObjectRef(spec.external[n]) for n in refs_wanted]
        for n, value in zip(refs_wanted, session_get(keep)):
            values[n] = value
    return values


def _submit_message(client: Client, spec: GraphSpec, number: int, wanted: list,
                    fail_fast: bool, notify: bool) -> P.SubmitGraph:
    """The one message that carries a graph.  Large data goes first into shared
    memory (each reader maps it in place), or else to the workers' stores."""
    data_holders = {}
    data = spec.data_blobs
    shared = {}
    if spec.large_data and client.shm_prefix is not None:
        data = dict(data)
        data.update(_write_shared(spec.large_data, client.shm_prefix, shared))
    elif spec.large_data:
        prefix = f"d-{client.client_id.hex()}-{number}-"
        frames = {n: dumps_frames(v) for n, v in spec.large_data.items()}
        placed = client.store_many({prefix + str(n): f for n, f in frames.items()})
        data_holders = {
            n: (placed[prefix + str(n)], prefix + str(n), frames_nbytes(f))
            for n, f in frames.items()
        }
    table = spec.function_table
    return P.SubmitGraph(
        graph=number, names=[str(k) for k in spec.keys], deps=spec.deps,
        priorities=spec.priorities, bodies=spec.task_blobs, data=data, wanted=wanted,
        groups=[key_split(k) for k in spec.keys], function_table=table,
        table_id=table_id(table), fail_fast=fail_fast, notify=notify, external=spec.external,
        pinned=[], max_retries=allowed_failures(), retry_exceptions=False, resources=None,
        actor=None, create_actor=None, data_holders=data_holders, parent=None, shared=shared,
    )


def _write_shared(large: dict[int, Any], prefix: str, shared: dict) -> dict[int, bytes]:
    """Pickle large data nodes into shared memory, two at a time (the copies
    release the GIL, and the workers are idle until the graph is sent):
    {node: descriptor}, their files into ``shared``.  If one fails, none is left."""
    def write(item: tuple[int, Any]) -> tuple[int, bytes, str]:
        n, value = item
        return (n, *shared_memory.write(dumps_frames(value), prefix, "g"))

    descriptors: dict[int, bytes] = {}
    if len(large) == 1:
        results = [write(next(iter(large.items())))]
    else:
        with ThreadPoolExecutor(2, thread_name_prefix="daskray-graph-data") as pool:
            futures = [pool.submit(write, item) for item in large.items()]
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
        if errors:
            for _, _, path in results:
                shared_memory.unlink(path)
            raise errors[0]
    for n, descriptor, path in results:
        descriptors[n], shared[n] = descriptor, path
    return descriptors


def allowed_failures() -> int:
    """How often a task of a dask graph runs again when its worker dies under it:
    dask's own setting ``distributed.scheduler.allowed-failures`` (default 3), as
    with dask.distributed.  A task that takes down every worker it runs on thus
    fails its graph with ``WorkerCrashedError`` after that many replacements."""
    value = dask.config.get("distributed.scheduler.allowed-failures", 3)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        raise ValueError(
            f"distributed.scheduler.allowed-failures must be a whole number, got {value!r}"
        ) from None


def _run_on_cluster(client: Client, spec: GraphSpec, state: dict, pretask: list,
                    posttask: list, notify: bool, wanted: list, values: dict) -> None:
    number, inbox = client.new_graph()
    with gc_tuning.paused():
        message = _submit_message(client, spec, number, wanted, fail_fast=True, notify=notify)
    client.send(message)
    tracker = _CallbackTracker(spec, state, pretask, posttask) if notify else None
    try:
        # a function of its own: on CPython 3.11-3.12 a KeyboardInterrupt raised at a
        # `continue` inside this try would skip the handler below (cpython#108214)
        failure = _receive(client, spec, inbox, set(wanted), values, tracker)
    except BaseException:
        _quietly(client.send, P.CancelGraph(number))
        client.forget(number)
        raise
    client.forget(number)
    if failure is not None:
        raise failure  # the head has dropped the graph already
    _quietly(client.send, P.ReleaseGraph(number))


def _receive(client: Client, spec: GraphSpec, inbox: queue.SimpleQueue, outstanding: set,
             values: dict, tracker: "_CallbackTracker | None") -> BaseException | None:
    """Take messages for one graph until every wanted value is in ``values``.

    Returns the graph's error when it failed on the cluster (the head then has
    forgotten it); raises only for failures here in the driver.
    """
    while outstanding:
        try:
            msg = inbox.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
        t = type(msg)
        if t is P.Result:
            if msg.node in outstanding:
                if msg.inline is not None:
                    values[msg.node] = loads(msg.inline)
                else:
                    try:
                        values[msg.node] = client.fetch(msg.holder, msg.object_id)
                    except errors.ObjectLostError:
                        continue  # its worker died: the head computes it again
                outstanding.discard(msg.node)
        elif t is P.Started:
            if tracker:
                tracker.started(msg.node, msg.worker)
        elif t is P.Finished:
            if tracker:
                tracker.finished(msg.node, msg.worker, msg.inline)
        elif t is P.Error:
            return error_of(msg)
        elif isinstance(msg, Exception):
            return msg
    return None


def session_get(refs: list) -> list:
    return backend.current().get(refs)


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except errors.ClusterError:
        pass


class _CallbackTracker:
    """Keeps dask's callback ``state`` in step with what the cluster reports."""

    def __init__(self, spec: GraphSpec, state: dict, pretask: list, posttask: list) -> None:
        self.spec = spec
        self.state = state
        self.pretask = pretask
        self.posttask = posttask
        self.results = set(spec.requested)
        self.sortkey = _priority_of(spec).get
        self.alias_of: dict[Any, list] = {}
        for alias, node in spec.aliases.items():
            self.alias_of.setdefault(spec.keys[node], []).append(alias)

    def started(self, node: int, worker: str) -> None:
        key = self.spec.keys[node]
        if key in self.state["finished"]:
            return  # run again after its worker died: dask saw it finish already
        ready = self.state["ready"]
        for i in range(len(ready) - 1, -1, -1):  # usually at the end: dask's pop order
            if ready[i] == key:
                del ready[i]
                break
        self.state["running"].add(key)
        for f in self.pretask:
            f(key, self.spec.dsk, self.state)

    def finished(self, node: int, worker: str, inline: bytes | None) -> None:
        key = self.spec.keys[node]
        if key in self.state["finished"]:
            return
        value = loads(inline) if inline is not None else None
        self._finish(key, value, worker)
        pending = list(self.alias_of.get(key, ()))
        progress = True
        while pending and progress:  # an alias of an alias waits for the inner one
            progress = False
            for alias in list(pending):
                if alias in self.state["waiting"]:
                    continue
                pending.remove(alias)
                progress = True
                if alias not in self.state["finished"]:
                    self.started_alias(alias)
                    self._finish(alias, value, worker)

    def started_alias(self, key: Any) -> None:
        ready = self.state["ready"]
        if key in ready:
            ready.remove(key)
        self.state["running"].add(key)
        for f in self.pretask:
            f(key, self.spec.dsk, self.state)

    def _finish(self, key: Any, value: Any, worker: str) -> None:
        state = self.state
        if key not in state["dependents"]:
            return
        state["running"].add(key)
        state["cache"][key] = value
        finish_task(self.spec.dsk, key, state, self.results, self.sortkey)
        for f in self.posttask:
            f(key, value, self.spec.dsk, state, worker)



def persist(client: Client, collections: list, optimize_graph: bool = True,
            **kwargs: Any) -> list:
    """``dask.persist`` on daskray: compute, but leave the results in the cluster.

    dask hands persisting to a scheduler whose ``get`` has a ``persist``
    attribute.  The results stay where they were computed; the returned
    collections hold ObjectRefs to them (dask treats those as futures), so a
    later compute reads them in place and nothing travels to the driver.
    """
    expr, keys, rebuild = persist_plan(collections, optimize_graph)
    spec = build_graph(convert(expr), keys)
    refs = _submit_persistent(client, spec)
    return rebuild(dict(zip(keys, refs)))


def _submit_persistent(client: Client, spec: GraphSpec) -> list:
    """Submit ``spec`` as a remote graph: its outputs become ObjectRefs, kept alive
    by them (errors surface when they are read).  One value or ref per requested key."""
    outputs = [n for n in flatten_keys(spec.outputs)]
    wanted = sorted({n for n in outputs if n not in spec.local_values and n not in spec.external})
    number = client.next_number()
    me = client.client_id
    made = {n: ObjectRef((me, number, n), owned=True) for n in wanted}
    if wanted:
        client.send(_submit_message(client, spec, number, wanted, fail_fast=False, notify=False))
    out = []
    for n in outputs:
        if n in made:
            out.append(made[n])
        elif n in spec.external:
            out.append(ObjectRef(spec.external[n]))
        else:
            out.append(spec.local_values[n])
    return out
