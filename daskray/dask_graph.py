"""Dask graphs in, daskray graph specs out.

This is the only module that knows dask's graph format.  ``daskray.get`` receives
whatever ``dask.compute`` passes today -- a graph expression
(``dask._expr._HLGExprSequence``), a ``HighLevelGraph`` or a plain dict, holding
``dask._task_spec`` nodes or legacy tuples -- and :func:`build_graph` turns it into a
:class:`GraphSpec`: a flat, culled, checked list of nodes numbered ``0..n-1``.

    dsk ──materialise──> {key: GraphNode} ──cull from the requested keys──>
        ──resolve aliases──> nodes (Task | data) ──check cycles, order──> GraphSpec

* Only what the requested keys need is kept (dask's schedulers do the same).
* ``Alias`` nodes are resolved here: an alias is the same object as its target, so
  it costs no task.  ``DataNode`` values (and values given with ``cache=``) become
  *data* nodes: objects that exist before anything runs.
* A cycle, a missing dependency or a requested key that is not in the graph is an
  error raised here, before anything is sent.
* Priorities come from ``dask.order``, which keeps memory low.
* Task bodies are pickled one by one with a shared function table
  (:class:`~daskray.runtime.serialization.GraphEncoder`), so the head can forward
  each worker only what it runs.

A backend that hands the graph to another dask scheduler (dask.distributed) uses
:func:`cull_graph` instead: the same culling and checks, dask's own nodes out.
:func:`persist_plan` is what ``dask.persist`` asks of any backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from dask._task_spec import Alias, DataNode, GraphNode, convert_legacy_graph
from dask.order import order
from dask.sizeof import sizeof

from .errors import GraphError
from .refs import ref_key_of
from .runtime.serialization import GraphEncoder, describe, dumps, dumps_frames, frames_nbytes
from .scheduler.policy import INLINE_THRESHOLD

Key = Hashable
_NO_VALUE = object()


@dataclass
class GraphSpec:
    """A culled, checked dask graph, numbered ``0..n-1`` in dependency order.

    ``deps[i]`` are the node numbers task ``i`` reads; ``dep_keys`` (inside each
    task blob) are the dask keys the task expects them under, in the same order.
    Data nodes have ``task_blobs[i] is None`` and their pickled value in
    ``data_blobs[i]``.
    """

    keys: list[Key]
    deps: list[tuple[int, ...]]
    priorities: list[int]
    task_blobs: list[bytes | None]
    data_blobs: dict[int, bytes]
    #: data nodes too large to travel inline: their values (pickled as they are stored)
    large_data: dict[int, Any]
    function_table: bytes
    #: the requested keys, with every key replaced by its node number (lists kept)
    outputs: Any
    #: requested nodes whose value the driver already has (data), by number
    local_values: dict[int, Any] = field(default_factory=dict)
    #: the converted dask graph, for dask callbacks (``dsk`` argument of the hooks)
    dsk: dict = field(default_factory=dict)
    #: alias keys resolved to the node they name: {alias key: node number}
    aliases: dict[Key, int] = field(default_factory=dict)
    #: the requested keys, flattened
    requested: list[Key] = field(default_factory=list)
    #: nodes that are ObjectRefs (objects already in the cluster): {node: ref key}
    external: dict[int, tuple] = field(default_factory=dict)


def materialize(dsk: Any) -> Mapping:
    """The ``{key: node or legacy task}`` mapping behind any graph dask hands us."""
    if not isinstance(dsk, Mapping):
        if not hasattr(dsk, "__dask_graph__"):
            raise TypeError(
                f"daskray.get expects a dask graph (a dict, a HighLevelGraph or a "
                f"dask graph expression), got {describe(dsk)}"
            )
        dsk = dsk.__dask_graph__()
    return dsk


def flatten_keys(keys: Any) -> list[Key]:
    """The keys of a (possibly nested) list of keys, in order; a tuple is one key."""
    out: list[Key] = []
    stack = [keys]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def map_keys(keys: Any, fn: Any) -> Any:
    """Replace every key in a nested list structure by ``fn(key)``; lists stay lists."""
    if isinstance(keys, list):
        return [map_keys(k, fn) for k in keys]
    return fn(keys)


def convert(dsk: Any, cache: Mapping | None = None) -> dict:
    """Any graph dask hands us as ``{key: GraphNode}`` (legacy tuples converted)."""
    raw = materialize(dsk)
    return convert_legacy_graph(raw, all_keys=set(raw) | set(cache or ()))


def external_keys(graph: Mapping, keys: Any) -> list:
    """The ObjectRef keys the graph (or the request) reads but does not define."""
    found = {k for k in flatten_keys(keys) if k not in graph and ref_key_of(k) is not None}
    for node in graph.values():
        for dep in getattr(node, "dependencies", ()):
            if dep not in graph and ref_key_of(dep) is not None:
                found.add(dep)
    return sorted(found)


def build_graph(graph: dict, keys: Any, cache: Mapping | None = None) -> GraphSpec:
    """Cull and check a converted graph (see :func:`convert`) for the requested ``keys``.

    Raises ``KeyError`` for a requested key that is not in the graph,
    :class:`~daskray.errors.GraphError` for a missing dependency or a cycle, and
    :class:`~daskray.errors.SerializationError` for a task that cannot be pickled.
    """
    cache = dict(cache or {})
    wanted = flatten_keys(keys)
    nodes, aliases, node_of, topo = _cull_and_order(graph, wanted, cache)
    alias_index = {a: node_of(a) for a in aliases}
    culled = {k: graph[k] for k in nodes if k in graph and k not in cache}
    culled.update((a, graph[a]) for a in aliases)
    culled.update((k, DataNode(k, None)) for k in nodes if k in cache or k not in graph)
    priority = order(culled) if culled else {}

    encoder = GraphEncoder()
    keys_out: list[Key] = []
    deps: list[tuple[int, ...]] = []
    blobs: list[bytes | None] = []
    prio: list[int] = []
    data: dict[int, bytes] = {}
    large_data: dict[int, Any] = {}
    local_values: dict[int, Any] = {}
    renumber = {old: new for new, old in enumerate(topo)}
    wanted_nodes = {node_of(k) for k in wanted}
    needed_data = set()
    external: dict[int, tuple] = {}
    for old in topo:
        key = nodes[old]
        node = graph.get(key, _NO_VALUE)
        if key in cache or isinstance(node, DataNode) or node is _NO_VALUE:
            continue
        needed_data.update(node_of(d) for d in node.dependencies)
    for old in topo:
        key = nodes[old]
        new = renumber[old]
        keys_out.append(key)
        prio.append(priority.get(key, 0))
        node = graph.get(key, _NO_VALUE)
        if node is _NO_VALUE and key not in cache:  # an ObjectRef
            external[new] = ref_key_of(key)
            blobs.append(None)
            deps.append(())
            continue
        if key in cache or isinstance(node, DataNode):
            value = cache[key] if key in cache else node.value
            blobs.append(None)
            deps.append(())
            if old in needed_data:
                # clearly large (dask's own estimate): pickled later, while written
                # to the store, several at a time; else pickled now to find out
                frames = None if sizeof(value) > INLINE_THRESHOLD else dumps_frames(value)
                if frames is not None and frames_nbytes(frames) <= INLINE_THRESHOLD:
                    data[new] = frames[0] if len(frames) == 1 else dumps(value)
                else:  # stored before the graph is sent, not inline
                    large_data[new] = value
            if old in wanted_nodes:
                local_values[new] = value
            continue
        dep_keys = tuple(node.dependencies)
        deps.append(tuple(renumber[node_of(d)] for d in dep_keys))
        blobs.append(encoder.encode_task((node, dep_keys), key, name_is_key=True))

    return GraphSpec(
        keys=keys_out,
        deps=deps,
        priorities=prio,
        task_blobs=blobs,
        data_blobs=data,
        large_data=large_data,
        function_table=encoder.encode_table(),
        outputs=map_keys(keys, lambda k: renumber[node_of(k)]),
        local_values=local_values,
        dsk=graph,
        aliases={a: renumber[i] for a, i in alias_index.items()},
        requested=wanted,
        external=external,
    )


@dataclass
class CulledGraph:
    """What the requested keys need, checked, as dask's own nodes: for a backend that
    hands them to another dask scheduler (dask.distributed) rather than pickling
    them itself (:func:`build_graph`)."""

    #: the tasks and data the keys need, in dependency order; values given with
    #: ``cache=`` as DataNodes; no Alias, no ObjectRef
    nodes: dict[Key, GraphNode]
    #: every alias the keys reach: {alias key: the key of the node it names}
    aliases: dict[Key, Key]
    #: the ObjectRef keys read (objects already in the cluster), as refs' keys
    external: dict[Key, tuple]


def cull_graph(graph: dict, keys: Any, cache: Mapping | None = None) -> CulledGraph:
    """Cull and check a converted graph (see :func:`convert`) for the requested ``keys``,
    as :func:`build_graph` does, without numbering or pickling anything.

    Raises ``KeyError`` for a requested key that is not in the graph and
    :class:`~daskray.errors.GraphError` for a missing dependency or a cycle.
    """
    cache = dict(cache or {})
    found, aliases, _, topo = _cull_and_order(graph, flatten_keys(keys), cache)
    nodes: dict[Key, GraphNode] = {}
    external: dict[Key, tuple] = {}
    for i in topo:
        key = found[i]
        if key in cache:
            nodes[key] = DataNode(key, cache[key])
        elif key in graph:
            nodes[key] = graph[key]
        else:
            external[key] = ref_key_of(key)
    return CulledGraph(nodes, aliases, external)


def persist_plan(collections: list, optimize_graph: bool = True) -> tuple[Any, list, Any]:
    """How ``dask.persist`` hands collections to a scheduler:
    ``(graph expression, keys to keep, rebuild)``, where ``rebuild({key: value or
    ObjectRef})`` gives the persisted collections, in order."""
    from dask._expr import CompositeExpr, _ExprSequence
    from dask.base import _rebuild_composite_collection, collections_to_expr
    from dask.core import flatten

    expr = collections_to_expr(collections, optimize_graph)
    exprs = list(expr.operands) if isinstance(expr, _ExprSequence) else [expr]
    composite = any(isinstance(e, CompositeExpr) for e in exprs)
    expr = expr.optimize()
    if composite:
        exprs = list(expr.operands) if isinstance(expr, _ExprSequence) else [expr]
    if len(exprs) != len(collections):
        exprs = [None] * len(collections)
    keys: list = []
    rebuilds = []
    for coll, cexpr, ckeys in zip(collections, exprs, expr.__dask_keys__()):
        flat = list(flatten(ckeys))
        keys.extend(flat)
        if isinstance(cexpr, CompositeExpr):
            rebuilds.append((coll, cexpr, flat, None))
        else:
            rebuild, state = coll.__dask_postpersist__()
            rebuilds.append((rebuild, None, flat, state))

    def rebuild_all(held: dict) -> list:
        out = []
        for rebuild, cexpr, flat, state in rebuilds:
            if state is None:
                out.append(_rebuild_composite_collection(rebuild, flat, held,
                                                         cull_to_child_keys=True))
            else:
                out.append(rebuild({k: held[k] for k in flat}, *state))
        return out

    return expr, keys, rebuild_all


def _cull_and_order(graph: Mapping, wanted: list[Key],
                    cache: Mapping) -> tuple[list[Key], dict, Callable[[Key], int], list[int]]:
    """The checks and culling :func:`build_graph` and :func:`cull_graph` share:
    ``(nodes, {alias: target}, node_of, order)``, where ``node_of(key)`` is the index
    in ``nodes`` of a key or alias and ``order`` those indices in dependency order."""
    for key in wanted:
        if key not in graph and key not in cache and ref_key_of(key) is None:
            raise KeyError(key)
    nodes, aliases = _cull(graph, cache, wanted)
    index = {key: i for i, key in enumerate(nodes)}
    alias_index = {a: index[t] for a, t in aliases.items()}

    def node_of(key: Key) -> int:
        i = index.get(key)
        return alias_index[key] if i is None else i

    return nodes, aliases, node_of, _toposort(nodes, graph, cache, node_of)


def _cull(graph: Mapping, cache: Mapping, wanted: list[Key]) -> tuple[list[Key], dict]:
    """Walk from the wanted keys; return the real nodes reached and ``{alias: target}``.

    Iterative, so a 10,000-long chain is fine.  Alias chains are followed to the
    node they end at; an alias chain that loops is a cycle.
    """
    nodes: list[Key] = []
    aliases: dict[Key, Key] = {}
    seen: set[Key] = set()
    dependents: dict[Key, set] = {}
    stack = list(wanted)
    while stack:
        key = stack.pop()
        if key in seen:
            continue
        seen.add(key)
        if key in cache:
            nodes.append(key)
            continue
        node = graph.get(key)
        if node is None and ref_key_of(key) is not None:
            nodes.append(key)  # an ObjectRef: an object already in the cluster
            continue
        if node is None:
            raise GraphError(
                f"Missing dependency {key!r} for dependents "
                f"{sorted(map(repr, dependents.get(key, ())))}: the graph has no task "
                "or data under this key. Check that every key a task refers to is "
                "in the graph (or passed with cache=)."
            )
        if isinstance(node, Alias):
            target = _alias_target(graph, cache, key)
            aliases[key] = target
            dependents.setdefault(target, set()).add(key)
            stack.append(target)
            continue
        nodes.append(key)
        if isinstance(node, GraphNode):
            for dep in node.dependencies:
                dependents.setdefault(dep, set()).add(key)
                stack.append(dep)
    return nodes, aliases


def _alias_target(graph: Mapping, cache: Mapping, key: Key) -> Key:
    chain = [key]
    target = key
    while True:
        node = graph.get(target)
        if target in cache or not isinstance(node, Alias):
            return target
        target = node.target
        if target in chain:
            raise GraphError(
                "Cycle detected in the graph: "
                + " -> ".join(map(repr, chain + [target]))
                + ". A task cannot depend on itself, directly or through other tasks."
            )
        chain.append(target)


def _toposort(nodes: list[Key], graph: Mapping, cache: Mapping, node_of: Any) -> list[int]:
    """Node numbers in dependency order; a :class:`GraphError` naming a cycle if any."""
    n = len(nodes)
    deps_of: list[set[int]] = [set() for _ in range(n)]
    dependents: list[list[int]] = [[] for _ in range(n)]
    for i, key in enumerate(nodes):
        node = graph.get(key)
        if key in cache or node is None:
            continue
        for dep in node.dependencies:
            j = node_of(dep)
            if j not in deps_of[i]:
                deps_of[i].add(j)
                dependents[j].append(i)
    remaining = [len(d) for d in deps_of]
    ready = [i for i in range(n) if remaining[i] == 0]
    out: list[int] = []
    while ready:
        i = ready.pop()
        out.append(i)
        for d in dependents[i]:
            remaining[d] -= 1
            if remaining[d] == 0:
                ready.append(d)
    if len(out) < n:
        raise GraphError(
            "Cycle detected in the graph: "
            + " -> ".join(map(repr, _find_cycle(nodes, deps_of, remaining)))
            + ". A task cannot depend on itself, directly or through other tasks."
        )
    return out


def _find_cycle(nodes: list[Key], deps_of: list[set[int]], remaining: list[int]) -> list[Key]:
    """One cycle among the nodes Kahn's algorithm could not order, as keys."""
    start = next(i for i, r in enumerate(remaining) if r > 0)
    path: list[int] = []
    position: dict[int, int] = {}
    i = start
    while i not in position:
        position[i] = len(path)
        path.append(i)
        i = next(j for j in deps_of[i] if remaining[j] > 0)
    cycle = path[position[i]:] + [i]
    return [nodes[j] for j in reversed(cycle)]
