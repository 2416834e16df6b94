"""Checking what peers send the head, and turning it into scheduler events.

``protocol.decode`` checks a message's shape (its tag, its number of fields, plain
data only); what the fields hold is checked here, before the scheduler sees it: a
malformed message must not take the cluster down.  What fails raises
``ProtocolError``, and the sender is told.
"""

from __future__ import annotations

import os
from typing import Any

from ..scheduler import events as E
from . import protocol as P
from .records import (
    BlockedReport, DirectErredReport, DirectFinishedReport, DirectReleasedReport, ErredReport,
    FinishedReport, RefsReport, ReleasedReport, StartedReport,
)


def graph_of(msg: Any) -> int | None:
    """The graph a rejected message submitted, whose caller waits for an answer."""
    graph = msg.graph if type(msg) is P.SubmitGraph else None
    return graph if isinstance(graph, int) else None


def in_session(path: Any, prefix: str) -> bool:
    """Whether ``path`` names a shared-memory file of this session (and nothing else)."""
    return (isinstance(path, str) and path.startswith(prefix)
            and os.path.dirname(path) == os.path.dirname(prefix) and "/" not in path[len(prefix):])


def graph_event(msg: P.SubmitGraph, graph: Any, parent: Any, shm_prefix: str) -> E.GraphSubmitted:
    """The scheduler's event for a checked graph message: ``graph`` its id,
    ``parent`` the task that made the call (None unless a worker sent it)."""
    if any(not in_session(p, shm_prefix) for p in (msg.shared or {}).values()):
        raise P.ProtocolError("graph message: a shared file is not of this session")
    event = E.GraphSubmitted(
        graph=graph, names=msg.names, deps=msg.deps, priorities=msg.priorities,
        bodies=msg.bodies, data=msg.data, wanted=msg.wanted, groups=msg.groups,
        fail_fast=msg.fail_fast, notify=msg.notify, external=msg.external,
        pinned=msg.pinned, max_retries=msg.max_retries,
        retry_exceptions=msg.retry_exceptions, resources=msg.resources, actor=msg.actor,
        create_actor=msg.create_actor, data_holders=msg.data_holders, parent=parent,
        shared=msg.shared, direct=msg.direct,
    )
    if msg.direct is not None and not (isinstance(msg.direct, str) and msg.actor is not None):
        raise P.ProtocolError("graph message: only an actor's call is sent to a process directly")
    check_graph(event)
    return event


def put_event(msg: P.PutObject, graph: Any, shm_prefix: str) -> E.ObjectPut:
    """The scheduler's event for a checked ``put``."""
    if msg.shared is not None and not in_session(msg.shared, shm_prefix):
        raise P.ProtocolError("put: the shared file is not of this session")
    return E.ObjectPut(graph, msg.name, msg.inline, msg.holder, msg.nbytes,
                       msg.store_key, msg.shared)


def ran_a_task(items: list) -> bool:
    """Whether a worker's reports say it finished (or failed) a task."""
    return any(type(item) is FinishedReport or type(item) is ErredReport for item in items)


def report_events(wid: str, items: list) -> list[Any]:
    """The scheduler's events for a batch of reports from worker ``wid`` (what is
    no report is left out).  A list, made in one loop: one event per task run."""
    events: list[Any] = []
    add = events.append
    finished = E.TaskFinished
    for item in items:
        t = type(item)
        if t is FinishedReport:
            task, nbytes, inline, duration, contained = item
            add(finished(task, wid, nbytes, inline, duration, contained))
        elif t is ErredReport:
            add(E.TaskErred(item.task, wid, item.error))
        elif t is StartedReport:
            add(E.TaskStarted(item.task, wid))
        elif t is ReleasedReport:
            add(E.TaskReleased(item.task, wid))
        elif t is RefsReport:
            add(E.RefsChanged(item.added, item.dropped, wid.encode()))
        elif t is BlockedReport:
            add(E.WorkerBlocked(wid, item.blocked, item.task, item.awaits, item.nest))
        elif t is DirectFinishedReport:
            add(E.DirectCallDone(_ref(item.ref), wid, item.object_id, item.nbytes, item.inline,
                                 item.duration, item.contained, replied=not item.contained))
        elif t is DirectErredReport:
            add(E.DirectCallDone(_ref(item.ref), wid, "", error=item.error))
        elif t is DirectReleasedReport:
            add(E.DirectCallDone(_ref(item.ref), wid, "", released=True))
    return events


def _ref(ref: Any) -> tuple:
    """An ObjectRef key a worker reports, checked: (owner bytes, graph int, node int)."""
    if not (type(ref) is tuple and len(ref) == 3 and type(ref[0]) is bytes
            and type(ref[1]) is int and type(ref[2]) is int):
        raise P.ProtocolError(f"a direct call's report names no ObjectRef: {ref!r:.80}")
    return ref


def request_events(ident: bytes, msg: Any) -> list[Any]:
    """The scheduler's events for a client's request that is nothing but events
    (none for a message that is not such a request)."""
    t = type(msg)
    if t is P.RefsUpdate:
        return [E.RefsChanged(msg.added, msg.dropped, ident)]
    if t is P.SubscribeRefs:
        return [E.Subscribe(ident, msg.refs)]
    if t is P.CancelRefs:
        return [E.CancelRef(ref, msg.force, msg.recursive) for ref in msg.refs]
    if t is P.KillActorRequest:
        return [E.KillActor(msg.actor, not msg.no_restart)]
    if t is P.GetActor:
        return [E.LookupActor(ident, msg.name, msg.request, msg.namespace, msg.parent)]
    if t is P.ListActors:
        return [E.ListNamedActors(ident, msg.request, msg.all_namespaces, msg.parent)]
    if t is P.SetNamespace:
        return [E.ClientNamespace(ident, msg.namespace)]
    if t is P.WatchActor:
        return [E.WatchActor(ident, msg.actor)]
    if t is P.ReleaseGraph:
        return [E.GraphReleased((ident, msg.graph))]
    if t is P.CancelGraph:
        return [E.GraphCancelled((ident, msg.graph))]
    return []


def check_graph(ev: E.GraphSubmitted) -> None:
    """Reject a graph message whose parts do not fit together, before the
    scheduler sees it: a malformed message must not take the cluster down."""
    n = len(ev.names) if isinstance(ev.names, list) else -1
    if n < 0 or not all(isinstance(x, list) and len(x) == n
                        for x in (ev.deps, ev.priorities, ev.bodies)):
        raise P.ProtocolError("graph message: names, deps, priorities and bodies must be lists of one length")
    if ev.groups and (not isinstance(ev.groups, list) or len(ev.groups) != n):
        raise P.ProtocolError("graph message: groups must be a list as long as names")
    if not isinstance(ev.data, dict) or not isinstance(ev.wanted, list):
        raise P.ProtocolError("graph message: data must be a dict and wanted a list")
    for i, (deps, body) in enumerate(zip(ev.deps, ev.bodies)):
        if not isinstance(deps, (tuple, list)) or not all(
                type(d) is int and 0 <= d < i for d in deps):
            raise P.ProtocolError(f"graph message: node {i} has bad dependencies {deps!r:.80}")
        if body is None and deps or body is not None and not isinstance(body, bytes):
            raise P.ProtocolError(f"graph message: node {i} has a bad body (bytes, or None for data)")
    if not all(type(i) is int and 0 <= i < n for i in ev.wanted):
        raise P.ProtocolError("graph message: wanted names a node that does not exist")
    if not all(type(p) is int for p in ev.priorities):
        raise P.ProtocolError("graph message: priorities must be integers")
    for node, held in (ev.data_holders or {}).items():
        if not (type(node) is int and 0 <= node < n and ev.bodies[node] is None
                and isinstance(held, tuple) and len(held) == 3):
            raise P.ProtocolError(f"graph message: bad stored data node {node!r:.40}")
