"""Dask graphs on the dask.distributed backend: ``daskray.get`` and ``dask.persist``
through the session's ``distributed.Client``, with daskray's graph contract.

    dsk ──convert, cull, check (dask_graph)──> the nodes the keys need
        ──name every key for this call──> ──fuse linear chains──> client.get(sync=False)
        ──gather the requested keys (with dask callbacks: every task's result, as it comes)

``client.get`` alone does not keep that contract; each step says why it is there:

* *Names of this call.*  distributed keeps results by key: two graphs that use the
  same key names, one after the other or at once from two threads, would share
  results.  Every key gets the call's token appended to its name (:func:`call_name`),
  so distributed still groups a layer's tasks together, as it does for ``client.get``
  (its scheduling heuristics, and the dashboard, go by those groups).  An ObjectRef
  keeps its key: it names an object already on the cluster, which the session holds
  a Future for, so the graph depends on it directly.
* *Checked before sending.*  A requested key that is not in the graph raises
  ``KeyError``; a cycle or a missing dependency raises ``GraphError`` (a
  ``ValueError``), as on the local runtime, before anything runs.
* *Aliases never run*: an alias is its target.  Requested data nodes (and values given
  with ``cache=``) come back from the driver, not through the cluster.
* *Linear chains fused.*  A task that waits for the one before it costs distributed
  a few ms of messages; a chain whose links have one dependency and one dependent
  each runs as one task (dask's ``Task.fuse``), so a 10,001-task chain takes a
  second, not a minute.  Root tasks stay apart: distributed queues a layer's roots
  and hands them out as threads free up, and a root hidden in its dependent's task
  escapes that (an 8k array took twice as long).  Not while pretask/posttask
  callbacks watch: they see every task.
* *Errors.*  The task's own exception, its remote traceback as ``__cause__``; a task
  whose workers kept dying (``distributed.scheduler.allowed-failures``)
  ``WorkerCrashedError``.  A graph that fails or is interrupted is released at once:
  what has not run yet never will.

Dask callbacks run in the caller's thread with dask's ``state`` dict, as in
``dask_scheduler``.  What differs on this backend: distributed reports when a task
finished, not when it started, so ``pretask`` and ``posttask`` are called one right
after the other as each result arrives (a ``Profiler`` shows no task durations),
and ``posttask``'s ``worker_id`` is None.  As on the local runtime, every task's
result then travels to the driver (a diagnostics mode).  The ObjectRefs a graph
reads are in ``state["cache"]`` as the refs themselves.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

from dask._task_spec import Alias, DataNode, Task
from dask.local import finish_task, start_state_from_dask
from dask.order import order
from distributed import as_completed

from ..dask_callbacks import CallbackRun
from ..dask_graph import CulledGraph, convert, cull_graph, flatten_keys, persist_plan
from ..refs import ObjectRef, dask_key_of

Key = Any


# ================================================================ daskray.get


def get(session: Any, dsk: Any, keys: Any, cache: Mapping | None = None,
        callbacks: Any = None, **kwargs: Any) -> Any:
    """Compute ``keys`` of ``dsk`` on the dask cluster behind ``session``.

    ``keys`` is a key or (nested) lists of keys; lists come back as tuples.  Other
    keyword arguments (``num_workers``, ``pool``, ...) are accepted and ignored: the
    cluster's size is the dask cluster's.
    """
    graph = convert(dsk, cache)
    with CallbackRun(graph, callbacks) as run:
        culled = cull_graph(graph, keys, cache)
        watcher = None
        if run.active:
            watcher = _Watcher(graph, keys, cache, culled, run.pretask, run.posttask)
            run.begin(watcher.state)
        values = _compute(session, culled, flatten_keys(keys),
                          watcher if run.per_task else None)
        run.succeeded = True
        return _pack(keys, values)


def _compute(session: Any, culled: CulledGraph, wanted: list,
             watcher: _Watcher | None) -> dict:
    """{requested key: value}: ``culled`` run on the cluster, its data answered here."""
    plan = _plan(culled, wanted, fuse=watcher is None)
    values = dict(plan.local)
    # the session's Futures of the ObjectRefs read: the scheduler knows their keys,
    # so the graph depends on them directly (held by the session, never released here)
    refs = {k: session.table.future_of(r) for k, r in culled.external.items()}
    requested_refs = [refs[k] for k in plan.requested_refs]
    if watcher is None:
        futures = _submit(session, plan, plan.outputs)
        results = _gather(session, futures + requested_refs, release=futures)
        by_name = dict(zip(plan.outputs + plan.requested_refs, results))
    else:
        watcher.start()
        by_name = _run_watched(session, plan, culled, watcher)
        by_name.update(zip(plan.requested_refs, _gather(session, requested_refs, release=[])))
    for key in wanted:
        if key not in values:
            values[key] = by_name[plan.names[culled.aliases.get(key, key)]]
    return values


def _pack(keys: Any, values: dict) -> Any:
    """``nested_get``: the requested structure, lists turned into tuples."""
    if isinstance(keys, list):
        return tuple(_pack(k, values) for k in keys)
    return values[keys]


# ================================================================ the graph sent


@dataclass
class _Plan:
    """What one call sends to the cluster, and how its answer is read."""

    #: the nodes sent, by their names on the cluster
    graph: dict = field(default_factory=dict)
    #: {key (task, data, alias or ObjectRef): its name on the cluster}
    names: dict = field(default_factory=dict)
    #: the names of the requested tasks, in the order they were first requested
    outputs: list = field(default_factory=list)
    #: requested ObjectRef keys (their own names), in order
    requested_refs: list = field(default_factory=list)
    #: {requested key: value} of the data answered from the driver
    local: dict = field(default_factory=dict)


def _plan(culled: CulledGraph, wanted: list, fuse: bool,
          output_names: Iterator[str] | None = None) -> _Plan:
    """Name every node for this call (the requested ones from ``output_names`` when
    given), leave out data nothing reads, fuse linear chains if ``fuse``."""
    plan = _Plan()
    nodes = culled.nodes
    names = plan.names
    outputs: list = []
    for key, target in ((k, culled.aliases.get(k, k)) for k in wanted):
        node = nodes.get(target)
        if isinstance(node, DataNode):
            plan.local[key] = node.value
        elif node is None:  # an ObjectRef
            if target not in plan.requested_refs:
                plan.requested_refs.append(target)
        elif target not in names:
            names[target] = next(output_names) if output_names else None
            outputs.append(target)
    token = uuid.uuid4().hex
    for key in nodes:
        if names.get(key) is None:
            names[key] = call_name(key, token)
    plan.outputs = [names[t] for t in outputs]
    names.update((k, k) for k in culled.external)
    names.update((a, names[t]) for a, t in culled.aliases.items())
    read = _read_keys(nodes, names)
    for key, node in nodes.items():
        name = names[key]
        if isinstance(node, DataNode) and name not in read:
            continue  # requested only: answered from the driver
        plan.graph[name] = node.substitute(names, key=name)
    if fuse:
        plan.graph = fuse_linear_chains(plan.graph, set(plan.outputs))
    return plan


def call_name(key: Key, token: str) -> Key:
    """``key``'s name in the call ``token``: the token appended to its name part,
    ``"x-1a2b"`` -> ``"x-1a2b-TOKEN"``, ``("x-1a2b", 0)`` -> ``("x-1a2b-TOKEN", 0)``.
    Distinct keys get distinct names; other keys (numbers, bytes) are wrapped."""
    if type(key) is str:
        return f"{key}-{token}"
    if type(key) is tuple and key and type(key[0]) is str:
        return (f"{key[0]}-{token}", *key[1:])
    return (f"key-{token}-wrapped", key)


def _read_keys(nodes: dict, names: dict) -> set:
    """The names of the nodes some task reads."""
    read: set = set()
    for node in nodes.values():
        read.update(node.dependencies)
    return {names[k] for k in read}


def fuse_linear_chains(graph: dict, keep: set) -> dict:
    """``graph`` (in dependency order) with every linear chain as one task under the
    key of its last link.

    A node joins the task of its dependent when it is that dependent's only
    dependency, the dependent is its only one, it is not a root (it has
    dependencies: distributed schedules roots its own way) and not in ``keep``
    (requested: its value must stay addressable).  Inside, the chain runs as a subgraph
    (``Task.fuse``), so the fused task has the chain's first link's dependencies.
    """
    dependents: dict[Key, list] = {k: [] for k in graph}
    for key, node in graph.items():
        for dep in node.dependencies:
            if dep in dependents:
                dependents[dep].append(key)

    def joins_dependent(key: Key) -> bool:
        users = dependents[key]
        return (len(users) == 1 and key not in keep and not graph[key].block_fusion
                and bool(graph[key].dependencies)
                and len(graph[users[0]].dependencies) == 1
                and not graph[users[0]].block_fusion)

    fused: dict = {}
    for key, node in graph.items():
        if joins_dependent(key):
            continue
        chain = [node]
        while len(chain[-1].dependencies) == 1:
            (dep,) = chain[-1].dependencies
            if dep not in graph or not joins_dependent(dep):
                break
            chain.append(graph[dep])
        fused[key] = Task.fuse(*reversed(chain), key=key) if len(chain) > 1 else node
    return fused


def _submit(session: Any, plan: _Plan, names: list) -> list:
    """Send the plan's graph; the Futures of ``names``, in order (none if empty)."""
    if not names:
        return []
    return session.client.get(plan.graph, names, sync=False)


def _gather(session: Any, futures: list, release: list) -> list:
    """The futures' values, waiting outside the worker's thread pool inside a task.
    ``release`` (this call's own Futures) are released at the end, so a graph that
    failed or was interrupted stops at once."""
    if not futures:
        return []
    try:
        with session.waiting():
            return session.client.gather(futures)
    except Exception as exc:
        raise session.daskray_error(exc)  # noqa: B904 - its __cause__ is the remote traceback
    finally:
        for future in release:
            future.release()


# ================================================================ dask callbacks


def _run_watched(session: Any, plan: _Plan, culled: CulledGraph, watcher: _Watcher) -> dict:
    """Run the (unfused) plan, telling ``watcher`` each task's result as it arrives:
    {name: value} of the requested tasks."""
    key_of = {plan.names[key]: key for key, node in culled.nodes.items()
              if not isinstance(node, DataNode)}
    names = list(key_of)
    futures = _submit(session, plan, names)
    outputs = set(plan.outputs)
    values: dict = {}
    try:
        with session.waiting():
            for future in as_completed(futures, loop=session.client.loop):
                value = future.result()
                if future.key in outputs:
                    values[future.key] = value
                else:
                    future.release()  # the driver has it; the cluster frees it when read
                watcher.arrived(key_of[future.key], value)
    except Exception as exc:
        raise session.daskray_error(exc)  # noqa: B904 - its __cause__ is the remote traceback
    finally:
        for future in futures:
            future.release()
    return values


class _Watcher:
    """dask's callback ``state`` (``dask.local``'s shape) kept in step with the
    results as they arrive, calling ``pretask`` and ``posttask`` for each task.

    A result can arrive before dask's state has its task ready (the client learns of
    finished tasks in the order the scheduler reports them): it then waits in
    ``early`` until its dependencies finished.  Aliases finish as soon as their
    target did.
    """

    def __init__(self, graph: dict, keys: Any, cache: Mapping | None, culled: CulledGraph,
                 pretask: list, posttask: list) -> None:
        self.graph = graph
        self.pretask = pretask
        self.posttask = posttask
        self.results = set(flatten_keys(keys))
        priorities = order({**culled.nodes, **{a: graph[a] for a in culled.aliases},
                            **{k: DataNode(k, None) for k in culled.external}})
        self.sortkey = lambda key: priorities.get(key, 0)
        # the objects already on the cluster are there from the start, as data is
        known = {**(cache or {}), **{k: ObjectRef(r) for k, r in culled.external.items()}}
        self.state = start_state_from_dask(graph, cache=known, sortkey=self.sortkey,
                                           keys=list(self.results))
        self.early: dict = {}

    def start(self) -> None:
        """The graph is sent: the aliases of data and ObjectRefs finish at once."""
        self._finish_ready([k for k in self.state["ready"] if self._is_alias(k)])

    def arrived(self, key: Key, value: Any) -> None:
        """The result of task ``key``."""
        if key not in self.state["dependents"] or key in self.state["finished"]:
            return
        if key in self.state["waiting"]:
            self.early[key] = value
            return
        self._finish(key, value)
        self._finish_ready(list(self.state["dependents"][key]))

    def _is_alias(self, key: Key) -> bool:
        return isinstance(self.graph.get(key), Alias)

    def _finish_ready(self, candidates: list) -> None:
        """Finish the aliases and early results among ``candidates`` that are ready
        now, and so on down their dependents."""
        state = self.state
        stack = list(candidates)
        while stack:
            key = stack.pop()
            if key in state["waiting"] or key in state["finished"]:
                continue
            if self._is_alias(key):
                value = state["cache"][self.graph[key].target]
            elif key in self.early:
                value = self.early.pop(key)
            else:
                continue
            self._finish(key, value)
            stack.extend(state["dependents"][key])

    def _finish(self, key: Key, value: Any) -> None:
        state = self.state
        ready = state["ready"]
        for i in range(len(ready) - 1, -1, -1):  # usually near the end: dask's pop order
            if ready[i] == key:
                del ready[i]
                break
        state["running"].add(key)
        for f in self.pretask:
            f(key, self.graph, state)
        state["cache"][key] = value
        finish_task(self.graph, key, state, self.results, self.sortkey)
        for f in self.posttask:
            f(key, value, self.graph, state, None)


# ================================================================ dask.persist


def persist(session: Any, collections: list, optimize_graph: bool = True,
            **kwargs: Any) -> list:
    """``dask.persist`` on the dask cluster: the results stay there.

    Each result is named as an ObjectRef of this session (``dask_key_of``) and its
    Future joins the session's table, so the returned collections hold ObjectRefs:
    later computes and ``daskray.get`` read the data in place, and it is freed when
    the last ref to it is dropped.  Errors surface when a result is read.
    """
    expr, keys, rebuild = persist_plan(collections, optimize_graph)
    culled = cull_graph(convert(expr), keys)
    number = session.new_number()
    ref_keys: list = []

    def ref_names() -> Iterator[str]:
        while True:
            ref_keys.append((session.owner, number, len(ref_keys)))
            yield dask_key_of(ref_keys[-1])

    plan = _plan(culled, keys, fuse=True, output_names=ref_names())
    futures = _submit(session, plan, plan.outputs)
    made = {}
    for ref_key, name, future in zip(ref_keys, plan.outputs, futures):
        session.table.own(ref_key, future)
        made[name] = ObjectRef(ref_key, owned=True)
    held = dict(plan.local)
    for key in keys:
        target = culled.aliases.get(key, key)
        if key in held:
            continue
        if target in culled.external:
            held[key] = ObjectRef(culled.external[target])
        else:
            held[key] = made[plan.names[target]]
    return rebuild(held)
