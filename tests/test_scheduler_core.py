"""The scheduler core as plain data: events in, exact instructions out. No processes."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import sys

import pytest

from daskray.scheduler import SchedulerState
from daskray.scheduler.events import (
    CancelRef, ClientLost, GraphCancelled, GraphReleased, GraphSubmitted, KillActor, RefsChanged,
    TaskErred, TaskFinished,
    TaskReleased, TaskStarted, Tick, WorkerBlocked, WorkerJoined, WorkerLost,
)
from daskray.scheduler.instructions import (
    CancelTasks, Dispatch, ForgetGraph, FreeObjects, NotifyRef, ReportError, ReportFinished,
    StartActor, StopActor,
    ReportResult, ReportStarted, RetireWorker, StartExtraWorker,
)
from daskray.scheduler.policy import EXTRA_IDLE_SECONDS, EXTRA_START_DELAY, INLINE_THRESHOLD

G = ("client", 1)


def graph(deps, wanted, gid=G, priorities=None, data=None, notify=False, groups=None):
    n = len(deps)
    data = data or {}
    return GraphSubmitted(
        gid, [f"t{i}" for i in range(n)], deps, priorities or list(range(n)),
        [None if i in data else f"body{i}".encode() for i in range(n)],
        data, wanted, groups=groups or ["g"] * n, fail_fast=True, notify=notify,
    )


def of(kind, instructions):
    return [i for i in instructions if isinstance(i, kind)]


def finish(s, task, worker, nbytes=8, inline=b"v", duration=0.001):
    return s.handle(TaskFinished(task, worker, nbytes, inline, duration))


@pytest.fixture
def s():
    state = SchedulerState(validate=True)
    state.handle(WorkerJoined("a"))
    return state


def test_chain_runs_in_order_and_frees_intermediates(s):
    out = s.handle(graph([(), (0,), (1,)], wanted=[2]))
    assert [(d.worker, d.task, d.deps) for d in of(Dispatch, out)] == [("a", 0, ())]
    out = finish(s, 0, "a")
    assert of(Dispatch, out) == [Dispatch("a", 1, G, b"body1", ((0, ("local",)),))]
    out = finish(s, 1, "a")
    # t0's last dependent finished: freed on the worker holding it
    assert FreeObjects("a", (0,)) in out
    assert of(Dispatch, out)[0].task == 2
    out = finish(s, 2, "a", inline=b"result")
    assert FreeObjects("a", (1,)) in out
    assert of(ReportResult, out) == [ReportResult(G, 2, b"result", None, 2)]
    out = s.handle(GraphReleased(G))
    assert FreeObjects("a", (2,)) in out
    assert ForgetGraph(G) in out
    assert s.tasks == {} and s.graphs == {}


def test_priorities_decide_dispatch_order(s):
    s.handle(WorkerJoined("b"))
    s.workers.pop("b")  # one worker, so the order is visible
    out = s.handle(graph([(), (), ()], wanted=[0, 1, 2], priorities=[5, 1, 3]))
    assert [d.task for d in of(Dispatch, out)] == [1, 2]  # 1 running + 1 queued
    out = finish(s, 1, "a")
    assert [d.task for d in of(Dispatch, out)] == [0]


def test_large_input_places_dependent_on_its_holder():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    s.handle(graph([(), (), (0,)], wanted=[2]))
    big = INLINE_THRESHOLD * 10
    # t0 ran on b, t1 on a (dispatch alternates by load); t0's result is large
    holder_of_0 = s.tasks[0].worker
    other = "a" if holder_of_0 == "b" else "b"
    out = s.handle(TaskFinished(0, holder_of_0, big, None, 0.001))
    (d,) = of(Dispatch, out)
    assert d.worker == holder_of_0 and d.deps == ((0, ("local",)),)
    assert other != holder_of_0


def test_small_input_travels_inline_to_another_worker():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(graph([(), (0,), (0,)], wanted=[1, 2]))
    s.handle(WorkerJoined("b"))
    out = s.handle(TaskFinished(0, "a", 8, b"zero", 0.001))
    # two ready tasks, two idle workers: one each; b gets the input inline
    by_worker = {d.worker: d.deps for d in of(Dispatch, out)}
    assert by_worker == {"a": ((0, ("local",)),), "b": ((0, ("inline", b"zero")),)}


def test_prefetch_follows_duration_estimates(s):
    s.handle(graph([()] * 300, wanted=list(range(300)), groups=["fast"] * 300))
    # unknown durations: one running + one queued
    assert len(s.workers["a"].processing) == 2
    for tid in sorted(s.workers["a"].processing):
        finish(s, tid, "a", duration=0.00001)
    # now known to be fast: many tasks are queued on the worker at once
    assert len(s.workers["a"].processing) > 50


def test_error_fails_graph_and_cancels_the_rest():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    s.handle(graph([(), (), (0, 1)], wanted=[2]))
    where = {tid: s.tasks[tid].worker for tid in (0, 1)}
    out = s.handle(TaskErred(0, where[0], b"boom"))
    assert of(ReportError, out) == [ReportError(G, 0, error=b"boom")]
    assert of(CancelTasks, out) == [CancelTasks(where[1], (1,))]
    assert s.tasks == {} and s.graphs == {}
    # the cancelled task's late report frees its result and dispatches nothing
    out = s.handle(TaskFinished(1, where[1], 8, b"x", 0.1))
    assert out == [FreeObjects(where[1], (1,))]
    assert not s.workers[where[1]].processing


def test_worker_lost_fails_graphs_it_touched_only():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    s.handle(graph([()], wanted=[0], gid=("c", 1)))
    s.handle(graph([()], wanted=[0], gid=("c", 2)))
    victim = s.tasks[0].worker
    survivor_task = 1 if s.tasks[1].worker != victim else None
    out = s.handle(WorkerLost(victim, "was killed by SIGKILL"))
    (err,) = of(ReportError, out)
    assert err.graph == ("c", 1) and err.kind == "WorkerCrashedError"
    assert "SIGKILL" in err.message and "t0" in err.message
    assert ("c", 1) not in s.graphs
    if survivor_task is not None:
        assert ("c", 2) in s.graphs


def test_lost_large_result_still_needed_fails_graph():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(graph([(), (0,)], wanted=[1]))
    s.handle(TaskFinished(0, "a", INLINE_THRESHOLD * 2, None, 0.001))
    # t1 is now processing on a too; a second worker joins, then a dies
    s.handle(WorkerJoined("b"))
    out = s.handle(WorkerLost("a", "exited with code 1"))
    assert of(ReportError, out)[0].kind == "WorkerCrashedError"


def test_small_result_survives_its_worker():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(graph([(), (0,)], wanted=[1]))
    s.handle(TaskFinished(0, "a", 8, b"zero", 0.001))
    s.handle(WorkerJoined("b"))
    # t1 was dispatched to a before b joined; a finishes it then dies before the client reads
    s.handle(TaskFinished(1, "a", 8, b"one", 0.001))
    out = s.handle(WorkerLost("a", "exited with code 1"))
    assert of(ReportError, out) == []


def test_data_nodes_are_in_memory_from_the_start(s):
    out = s.handle(graph([(), (0,)], wanted=[1], data={0: b"data"}))
    (d,) = of(Dispatch, out)
    assert d.task == 1 and d.deps == ((0, ("inline", b"data")),)


def test_cancel_graph_and_client_lost(s):
    s.handle(graph([(), ()], wanted=[0, 1]))
    out = s.handle(GraphCancelled(G))
    assert of(CancelTasks, out) == [CancelTasks("a", (0, 1))]
    out = s.handle(TaskReleased(0, "a"))
    out += s.handle(TaskReleased(1, "a"))
    assert not s.workers["a"].processing
    s.handle(graph([()], wanted=[0], gid=("other", 1)))
    out = s.handle(ClientLost("other"))
    assert of(CancelTasks, out) and not s.graphs


def test_notify_graph_reports_starts_and_finishes(s):
    s.handle(graph([()], wanted=[0], notify=True))
    assert of(ReportStarted, s.handle(TaskStarted(0, "a"))) == [ReportStarted(G, 0, "a")]
    out = finish(s, 0, "a", inline=b"v")
    assert of(ReportFinished, out) == [ReportFinished(G, 0, "a", b"v")]


def test_idle_worker_takes_queued_work_of_another():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(graph([(), (0,), (0,), (0,), (0,)], wanted=[1, 2, 3, 4],
                   groups=["load", "slow", "slow", "slow", "slow"]))
    s.handle(TaskFinished(0, "a", INLINE_THRESHOLD * 2, None, 0.001))
    # all four read a's large result, so they are placed on a; a runs one, queues one
    assert len(s.workers["a"].processing) == 2 and len(s.workers["a"].queue) == 2
    out = s.handle(WorkerJoined("b"))
    # b had nothing to do: it took one of a's waiting tasks and reads the input from a
    (d,) = of(Dispatch, out)
    assert d.worker == "b" and d.deps == ((0, ("peer", "a")),)


def test_released_task_is_rescheduled(s):
    s.handle(graph([()], wanted=[0]))
    out = s.handle(TaskReleased(0, "a"))
    assert of(Dispatch, out) == [Dispatch("a", 0, G, b"body0", ())]


def test_many_graphs_share_workers_and_keep_ids_apart(s):
    s.handle(graph([(), (0,)], wanted=[1], gid=("c", 1)))
    s.handle(graph([(), (0,)], wanted=[1], gid=("c", 2)))
    assert set(s.tasks) == {0, 1, 2, 3}
    assert s.tasks[2].graph.id == ("c", 2) and s.tasks[3].deps == (2,)


def test_submitting_a_graph_twice_is_an_error(s):
    s.handle(graph([()], wanted=[0]))
    with pytest.raises(ValueError, match="twice"):
        s.handle(graph([()], wanted=[0]))


# --------------------------------------------------------------------- actors


def actor_graph(gid, actor=None, create=None, pinned=None):
    return GraphSubmitted(gid, ["call"], [()], [0], [b"body"], {}, [0], fail_fast=False,
                          pinned=pinned, actor=actor, create_actor=create, max_retries=0)


def test_killing_an_actor_before_it_started_leaves_nothing():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w1"))
    s.handle(actor_graph((b"c", 1), create={"id": "A"}))
    out = s.handle(KillActor("A"))
    assert StopActor("A", None) in out
    (note,) = of(NotifyRef, out)
    assert note.kind == "ActorDiedError"
    s.handle(RefsChanged([], [(b"c", 1, 0)], b"c"))
    assert s.tasks == {} and s.graphs == {} and s.actors == {}


def test_a_restarted_actor_runs_its_constructor_again_even_if_it_died_in_it():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w1"))
    s.handle(actor_graph((b"c", 1), create={"id": "A", "max_restarts": 2}))
    s.handle(actor_graph((b"c", 2), actor="A", pinned=[(b"c", 1, 0)]))
    assert [d.task for d in of(Dispatch, s.handle(WorkerJoined("a1", actor="A")))] == [0]
    assert of(StartActor, s.handle(WorkerLost("a1", "segfault")))
    # the constructor first, and the call only once it has finished
    assert [d.task for d in of(Dispatch, s.handle(WorkerJoined("a2", actor="A")))] == [0]
    assert [d.task for d in of(Dispatch, finish(s, 0, "a2"))] == [1]


def test_a_detached_actor_without_handles_keeps_its_constructor_for_restarts():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w1"))
    s.handle(actor_graph((b"c", 1), create={"id": "A", "name": "n", "detached": True,
                                           "max_restarts": 1}))
    s.handle(WorkerJoined("a1", actor="A"))
    finish(s, 0, "a1")
    s.handle(RefsChanged([], [(b"c", 1, 0)], b"c"))  # the last handle is dropped
    assert "A" in s.actors and 0 in s.tasks
    s.handle(actor_graph((b"c", 2), actor="A"))
    s.handle(WorkerLost("a1", "crash"))
    assert [d.task for d in of(Dispatch, s.handle(WorkerJoined("a2", actor="A")))] == [0]


def test_a_second_live_actor_cannot_take_a_name_and_a_dead_one_frees_it():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w1"))
    s.handle(actor_graph((b"c", 1), create={"id": "A", "name": "n"}))
    out = s.handle(actor_graph((b"c", 2), create={"id": "B", "name": "n"}))
    (note,) = of(NotifyRef, out)
    assert "exists already" in note.message
    s.handle(KillActor("A"))
    assert "n" not in s.actor_names
    assert not of(NotifyRef, s.handle(actor_graph((b"c", 3), create={"id": "C", "name": "n"})))


def test_inputs_of_one_task_are_made_on_one_worker():
    """x[i, j] and x[j, i] of ``x + x.T`` (adjacent in priority): taken together."""
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    # roots 0..5 in priority order; 6 = f(0, 1), 7 = f(2, 3), 8 = f(4, 5)
    out = s.handle(graph([(), (), (), (), (), (), (0, 1), (2, 3), (4, 5)], wanted=[6, 7, 8]))
    where = {d.task: d.worker for d in of(Dispatch, out)}
    assert where[0] == where[1] and where[2] == where[3] and where[0] != where[2]
    # the pair still waiting goes together too, to whichever worker frees up first
    later = {}
    for task in (0, 1):
        out = s.handle(TaskFinished(task, where[0], INLINE_THRESHOLD * 10, None, 0.001))
        later.update({d.task: d.worker for d in of(Dispatch, out)})
    assert later.get(4) == later.get(5) == where[0]


def test_siblings_are_not_hoarded_behind_a_long_task():
    """Four slow inputs of one task on two workers: two each, not four on one."""
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    s.handle(graph([(), (), (), (), (0, 1, 2, 3)], wanted=[4]))
    ran = {w: set(ws.processing) for w, ws in s.workers.items()}
    assert all(ran.values()), "both workers got work at once"
    # whoever finishes first takes what is left: no one runs more than two
    first = min(ran, key=lambda w: len(ran[w]))
    out = finish(s, next(iter(ran[first])), first)
    ran[first].update(d.task for d in of(Dispatch, out))
    assert sorted(len(v) for v in ran.values()) == [2, 2], ran


def lineage_graph(deps, wanted, max_retries=3):
    n = len(deps)
    return GraphSubmitted(G, [f"t{i}" for i in range(n)], deps, list(range(n)),
                          [f"body{i}".encode() for i in range(n)], {}, wanted, groups=["g"] * n,
                          fail_fast=True, notify=False, max_retries=max_retries)


def test_a_lost_intermediate_is_computed_again_with_its_freed_inputs():
    big = INLINE_THRESHOLD * 10
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    # t0 -> t1 -> t2 (wanted), and t3 (wanted) also reads t1
    s.handle(lineage_graph([(), (0,), (1,), (1,)], wanted=[2, 3]))
    s.handle(TaskFinished(0, "a", big, None, 0.001))
    s.handle(TaskFinished(1, "a", big, None, 0.001))  # t0 is freed now
    s.handle(TaskFinished(2, "a", 8, b"two", 0.001))
    assert s.tasks[0].holders == set() and s.tasks[0].inline is None
    s.handle(WorkerJoined("b"))
    out = s.handle(WorkerLost("a", "was killed by SIGKILL"))
    assert not of(ReportError, out), out
    # t3 was running on a: it runs again, after t1, which needs t0 again first
    (d,) = of(Dispatch, out)
    assert (d.worker, d.task) == ("b", 0)
    assert s.tasks[1].state == "waiting" and s.tasks[3].state == "waiting"
    out = s.handle(TaskFinished(0, "b", big, None, 0.001))
    assert [(x.task, x.deps) for x in of(Dispatch, out)] == [(1, ((0, ("local",)),))]
    out = s.handle(TaskFinished(1, "b", big, None, 0.001))
    assert [x.task for x in of(Dispatch, out)] == [3]
    out = s.handle(TaskFinished(3, "b", 8, b"three", 0.001))
    assert ReportResult(G, 3, b"three", None, 3) in of(ReportResult, out)
    assert s.graphs[G].unfinished == 0


def test_a_reader_running_elsewhere_when_its_input_is_lost_runs_again_if_it_fails():
    big = INLINE_THRESHOLD * 10
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    # t0 -> t2 and t1 -> t3 on different workers; t4 reads t2 and t3
    s.handle(lineage_graph([(), (), (0,), (1,), (2, 3)], wanted=[4]))
    assert {s.tasks[0].worker, s.tasks[1].worker} == {"a", "b"}
    for t in (0, 1):
        s.handle(TaskFinished(t, s.tasks[t].worker, big, None, 0.001))
    for t in (2, 3):
        out = s.handle(TaskFinished(t, s.tasks[t].worker, big, None, 0.001))
    (d,) = of(Dispatch, out)
    reader_on = d.worker
    lost_on = "a" if reader_on == "b" else "b"
    lost = 2 if s.tasks[2].holders == {lost_on} else 3
    out = s.handle(WorkerLost(lost_on, "was killed by SIGKILL"))
    assert not of(ReportError, out)
    # its input t0 or t1 was freed and lived on the dead worker too: first that again
    first = lost - 2
    assert s.tasks[first].state in ("ready", "processing") and s.tasks[lost].state == "waiting"
    # the reader fails reading the dead worker's object: no error, it waits again
    out = s.handle(TaskErred(4, reader_on, b"ObjectLostError"))
    assert not of(ReportError, out) and s.tasks[4].state == "waiting"
    s.handle(TaskFinished(first, reader_on, big, None, 0.001))
    out = s.handle(TaskFinished(lost, reader_on, big, None, 0.001))
    assert [x.task for x in of(Dispatch, out)] == [4]
    out = s.handle(TaskFinished(4, reader_on, 8, b"four", 0.001))
    assert of(ReportResult, out) == [ReportResult(G, 4, b"four", None, 4)]


def remote_call(gid, deps=(), max_retries=3, external=None, pinned=None, resources=None):
    """One ``f.remote(...)``: its ObjectRef arguments (``external``) first, the call last."""
    external = external or {}
    n = len(external) + 1
    call = n - 1
    names = [f"arg{i}" for i in range(n - 1)] + [f"call-{gid[1]}"]
    bodies = [None] * (n - 1) + [f"body-{gid[1]}".encode()]
    return GraphSubmitted(gid, names, [()] * (n - 1) + [tuple(deps)], [0] * n, bodies, {},
                          [call], groups=["g"] * n, fail_fast=False, notify=False,
                          external=external, pinned=pinned,
                          max_retries=max_retries, resources=resources)


def test_a_lost_result_of_a_remote_call_is_computed_again_from_its_lineage():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    big = INLINE_THRESHOLD * 10
    # x = f.remote(); y = g.remote(x): both finished on a, both refs held
    s.handle(remote_call(("c", 1)))
    s.handle(TaskFinished(0, "a", big, None, 0.001))
    s.handle(remote_call(("c", 2), deps=(0,), external={0: ("c", 1, 0)}))
    s.handle(TaskFinished(2, "a", big, None, 0.001))
    s.handle(WorkerJoined("b"))
    out = s.handle(WorkerLost("a", "was killed by SIGKILL"))
    assert not [n for n in of(NotifyRef, out) if n.error or n.kind], out
    # x runs again first (y needs it), using one of its retries; y waits for it
    assert [(d.worker, d.task) for d in of(Dispatch, out)] == [("b", 0)]
    assert s.tasks[0].retries_left == 2 and s.tasks[2].state == "waiting"
    out = s.handle(TaskFinished(0, "b", big, None, 0.001))
    # its owner learns the new place
    assert NotifyRef("c", ("c", 1, 0), None, "b", 0, None, None, None) in out
    assert [d.task for d in of(Dispatch, out)] == [2]
    out = s.handle(TaskFinished(2, "b", big, None, 0.001))
    assert NotifyRef("c", ("c", 2, 1), None, "b", 2, None, None, None) in out


def test_a_put_object_or_a_call_out_of_retries_is_lost_with_the_reason():
    from daskray.scheduler.events import ObjectPut

    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    big = INLINE_THRESHOLD * 10
    s.handle(ObjectPut(("c", 1), "put-1", None, "a", big, "put-key"))
    s.handle(remote_call(("c", 2), max_retries=0))
    s.handle(TaskFinished(1, "a", big, None, 0.001))
    s.handle(WorkerJoined("b"))
    out = s.handle(WorkerLost("a", "was killed by SIGKILL"))
    lost = {n.ref: n for n in of(NotifyRef, out)}
    assert lost[("c", 1, 0)].kind == "ObjectLostError"
    assert "made by put()" in lost[("c", 1, 0)].message
    assert lost[("c", 2, 0)].kind == "ObjectLostError"
    assert "max_retries" in lost[("c", 2, 0)].message
    assert not of(Dispatch, out)


def test_objects_a_recomputed_call_carries_in_its_arguments_are_pinned_again():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    big = INLINE_THRESHOLD * 10
    s.handle(remote_call(("c", 1)))
    s.handle(TaskFinished(0, "a", 8, b"inner", 0.001))
    # the call carries ObjectRef ("c", 1, 0) inside a list: pinned while it runs
    s.handle(remote_call(("c", 2), pinned=[("c", 1, 0)]))
    assert s.tasks[0].refs == 2
    s.handle(TaskFinished(1, "a", big, None, 0.001))
    assert s.tasks[0].refs == 1  # unpinned once it finished
    s.handle(WorkerJoined("b"))
    s.handle(WorkerLost("a", "was killed by SIGKILL"))
    assert s.tasks[1].state == "ready" or s.tasks[1].state == "processing"
    assert s.tasks[0].refs == 2  # pinned again while it runs again
    s.handle(TaskFinished(1, "b", big, None, 0.001))
    assert s.tasks[0].refs == 1


def test_a_reader_of_two_lost_inputs_waits_for_both_exactly():
    """B; A = f(B); R = g(A, B): all on one worker that dies while R runs."""
    big = INLINE_THRESHOLD * 10
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(lineage_graph([(), (0,), (1, 0)], wanted=[2]))
    s.handle(TaskFinished(0, "a", big, None, 0.001))
    s.handle(TaskFinished(1, "a", big, None, 0.001))
    s.handle(WorkerJoined("b"))
    out = s.handle(WorkerLost("a", "was killed by SIGKILL"))  # validate checks waiting_on
    assert not of(ReportError, out)
    assert s.tasks[2].state == "waiting" and s.tasks[2].waiting_on == 2
    s.handle(TaskFinished(0, "b", big, None, 0.001))
    out = s.handle(TaskFinished(1, "b", big, None, 0.001))
    assert [d.task for d in of(Dispatch, out)] == [2]


def test_lineage_reaches_back_to_the_graphs_data():
    """d (data) -> t1 -> t2 -> t3: t1's result, computed from d, is lost after
    t2 read it; d is kept by the graph, so t1 can run again."""
    big = INLINE_THRESHOLD * 10
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    ev = GraphSubmitted(G, ["d", "t1", "t2", "t3"], [(), (0,), (1,), (1, 2)], [0, 1, 2, 3],
                        [None, b"b1", b"b2", b"b3"], {0: b"data"}, [3], groups=["g"] * 4,
                        fail_fast=True, notify=False, max_retries=3)
    s.handle(ev)
    s.handle(TaskFinished(1, "a", big, None, 0.001))  # d's only reader is done
    assert s.tasks[0].inline == b"data", "graph data is kept for lineage"
    s.handle(TaskFinished(2, "a", big, None, 0.001))
    s.handle(WorkerJoined("b"))
    out = s.handle(WorkerLost("a", "was killed by SIGKILL"))
    assert not of(ReportError, out)
    (d,) = of(Dispatch, out)
    assert d.task == 1 and d.deps == ((0, ("inline", b"data")),)


def test_a_task_needing_a_dead_workers_resources_waits_for_its_replacement():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a", resources={"pin": 1}))
    s.handle(WorkerJoined("b"))
    out = s.handle(remote_call(("c", 1), resources={"pin": 1}))
    assert [(d.worker, d.task) for d in of(Dispatch, out)] == [("a", 0)]
    out = s.handle(WorkerLost("a", "was killed by SIGKILL"))
    assert not of(NotifyRef, out) and not of(Dispatch, out)  # b lacks "pin": it waits
    out = s.handle(WorkerJoined("a2", resources={"pin": 1}))
    assert [(d.worker, d.task) for d in of(Dispatch, out)] == [("a2", 0)]
    # resources no worker ever had fail at once, with what to do
    out = s.handle(remote_call(("c", 2), resources={"gpu": 1}))
    (failed,) = of(NotifyRef, out)
    assert failed.kind == "DaskrayError" and "daskray.init(resources=" in failed.message


def test_a_reader_of_an_input_whose_recompute_fails_fails_with_it():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w1"))
    big = INLINE_THRESHOLD * 10
    s.handle(remote_call(("c", 1)))
    s.handle(TaskFinished(0, "w1", big, None, 0.001))
    s.handle(WorkerJoined("w2", resources={"r": 1}))  # the reader runs there, not on w1
    s.handle(remote_call(("c", 2), deps=(0,), external={0: ("c", 1, 0)}, resources={"r": 1}))
    assert s.tasks[2].state == "processing" and s.tasks[2].worker == "w2"
    s.handle(WorkerLost("w1", "was killed by SIGKILL"))
    assert s.tasks[2].input_lost  # its read of x from w1 will fail: it may run again
    out = s.handle(TaskErred(0, "w2", b"boom"))  # x's second run raises
    assert s.tasks[0].state == "erred"
    out = s.handle(TaskErred(2, "w2", b"HolderLostError"))
    (told,) = [n for n in of(NotifyRef, out) if n.ref == ("c", 2, 1)]
    assert told.error == b"boom" and s.tasks[2].state == "erred"


def test_an_actor_call_whose_input_is_lost_fails_instead_of_running_out_of_order():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w1"))
    s.handle(actor_graph((b"c", 1), create={"id": "A"}))
    s.handle(WorkerJoined("a1", actor="A"))
    s.handle(TaskFinished(0, "a1", 8, b"h", 0.001))
    s.handle(GraphSubmitted((b"c", 2), ["f"], [()], [0], [b"f"], {}, [0], groups=["g"],
                            fail_fast=False, notify=False, max_retries=3))
    s.handle(TaskFinished(1, "w1", INLINE_THRESHOLD * 10, None, 0.001))
    n = len(s.tasks)
    s.handle(GraphSubmitted((b"c", 3), ["x", "call"], [(), (0,)], [0, 1], [None, b"m"], {}, [1],
                            groups=["g", "g"], fail_fast=False, notify=False,
                            external={0: (b"c", 2, 0)},
                            actor="A", max_retries=0))
    call = max(s.tasks)
    assert len(s.tasks) == n + 1 and s.tasks[call].state == "processing"
    s.handle(WorkerJoined("w2"))
    s.handle(WorkerLost("w1", "was killed by SIGKILL"))
    assert not s.tasks[call].input_lost
    out = s.handle(TaskErred(call, "a1", b"HolderLostError"))
    assert s.tasks[call].state == "erred" and of(NotifyRef, out)


def test_results_of_a_num_returns_call_are_computed_again_and_the_call_is_forgotten_with_them():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    big = INLINE_THRESHOLD * 10
    # num_returns=2: node 0 is the call, nodes 1 and 2 pick its results
    s.handle(GraphSubmitted(("c", 1), ["call", "call[0]", "call[1]"], [(), (0,), (0,)],
                            [0, 1, 2], [b"call", b"n0", b"n1"], {}, [1, 2], groups=["g"] * 3,
                            fail_fast=False, notify=False, max_retries=3))
    for t in (0, 1, 2):
        out = s.handle(TaskFinished(t, "a", big, None, 0.001))
    assert FreeObjects("a", (0,)) in out  # the call's own value goes; its lineage stays
    assert s.tasks[0].holders == set()
    s.handle(WorkerJoined("b"))
    out = s.handle(WorkerLost("a", "was killed by SIGKILL"))
    assert not of(NotifyRef, out)
    assert [d.task for d in of(Dispatch, out)] == [0]
    out = s.handle(TaskFinished(0, "b", big, None, 0.001))
    assert sorted(d.task for d in of(Dispatch, out)) == [1, 2]
    s.handle(TaskFinished(1, "b", big, None, 0.001))
    s.handle(TaskFinished(2, "b", big, None, 0.001))
    # the client drops both refs: everything of the graph goes
    out = s.handle(RefsChanged([], [("c", 1, 1), ("c", 1, 2)], "c"))
    assert of(ForgetGraph, out) == [ForgetGraph(("c", 1))]
    assert not s.tasks and not s.graphs


def test_sizes_count_what_the_state_holds_and_nothing_once_released():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    s.handle(remote_call(("c", 1)))
    held = s.sizes()
    assert held["workers"] == 2 and held["tasks"] == 1 and held["graphs"] == 1
    assert held["processing"] == 1
    s.handle(TaskFinished(0, s.tasks[0].worker, 8, b"x", 0.001))
    s.handle(RefsChanged([], [("c", 1, 0)], "c"))
    assert {k: v for k, v in s.sizes().items() if v} == {"workers": 2}


# ============================================================== tasks waiting in get()


def blocked(worker, task, *refs, nest=True):
    """Task ``task`` on ``worker`` waits in get() for the objects of ``refs``."""
    return WorkerBlocked(worker, True, task, tuple(refs), nest)


def resumed(worker, task):
    return WorkerBlocked(worker, False, task)


def block(s, worker, task, *refs, nest=True):
    """As a worker does when its task starts waiting: it says so, then hands back
    the tasks queued behind it but the calls that task made (it runs those on top
    of it).  The instructions of both."""
    out = s.handle(blocked(worker, task, *refs, nest=nest))
    for tid in sorted(s.workers[worker].processing - {task}):
        if s.tasks[tid].graph.parent != task or not nest:
            out += s.handle(TaskReleased(tid, worker))
    return out


def calls(s, first, last):
    """Remote calls ("c", first) .. ("c", last) from the driver."""
    for i in range(first, last + 1):
        s.handle(remote_call(("c", i)))


def test_a_waiting_worker_runs_a_driver_call_its_task_waits_for_wherever_it_is_queued():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    calls(s, 1, 3)  # task 0 runs on a, task 1 is queued there, task 2 waits: a is full
    assert s.workers["a"].processing == {0, 1} and s.tasks[2].state == "ready"
    # task 0 waits for task 2 (a ref it got inside an argument): a hands back task 1
    out = s.handle(blocked("a", 0, ("c", 3, 0)))
    assert not of(Dispatch, out)  # task 1 counts as a's until it is handed back
    out = s.handle(TaskReleased(1, "a"))
    # what task 0 waits for runs on top of it; task 1 is not for it
    assert of(Dispatch, out) == [Dispatch("a", 2, ("c", 3), b"body-3", (), False, 0)]
    out = finish(s, 2, "a")
    assert not of(Dispatch, out)  # still waiting: a runs nothing else
    out = s.handle(resumed("a", 0))
    assert [(d.task, d.parent) for d in of(Dispatch, out)] == [(1, None)]  # queued as before


def test_a_waiting_worker_runs_the_inputs_of_what_its_task_waits_for():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    calls(s, 1, 2)  # tasks 0 and 1
    # call 3 (task 3, node 1 of its graph) takes call 2's result as its argument
    s.handle(remote_call(("c", 3), deps=(0,), external={0: ("c", 2, 0)}))
    out = block(s, "a", 0, ("c", 3, 1))
    # task 0 waits for call 3, which waits for call 2: that one runs first
    assert [(d.worker, d.task, d.parent) for d in of(Dispatch, out)] == [("a", 1, 0)]
    out = finish(s, 1, "a")
    assert [(d.worker, d.task, d.parent) for d in of(Dispatch, out)] == [("a", 3, 0)]


def test_a_waiting_worker_runs_nothing_its_task_does_not_wait_for():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    calls(s, 1, 5)  # a runs 0 (2 queued), b runs 1 (3 queued), 4 waits
    assert s.workers["a"].processing == {0, 2} and s.workers["b"].processing == {1, 3}
    # a's task waits for b's, which runs: a takes nothing (and there are no extras)
    out = block(s, "a", 0, ("c", 2, 0)) + lend_a_while(s)
    assert not of(Dispatch, out) and not of(StartExtraWorker, out)
    assert s.workers["a"].processing == {0}
    out = finish(s, 1, "b")
    assert {d.worker for d in of(Dispatch, out)} == {"b"}


def test_a_waiting_worker_with_a_full_stack_runs_nothing_on_it():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    calls(s, 1, 3)
    out = block(s, "a", 0, ("c", 3, 0), nest=False)
    assert not of(Dispatch, out) and s.tasks[2].state == "ready"


def lend_a_while(s):
    """Time passes (Ticks over ``EXTRA_START_DELAY`` apart) while waiting workers
    have nothing to run: the instructions."""
    now = s.now + 1.0
    return s.handle(Tick(now)) + s.handle(Tick(now + 1.5 * EXTRA_START_DELAY))


def test_an_extra_worker_with_the_waiting_workers_resources_runs_the_work_waiting():
    s = SchedulerState(validate=True, max_extra_workers=1)
    s.handle(WorkerJoined("a", resources={"pin": 1}))
    s.handle(remote_call(("c", 1), resources={"pin": 1}))  # task 0 on a
    s.handle(remote_call(("c", 2), resources={"pin": 1}))  # task 1 queued there
    # task 0 waits for what nothing here can run (an actor's call, say)
    out = block(s, "a", 0, ("elsewhere", 1, 0))
    assert not of(StartExtraWorker, out)  # not at once: the wait may be a short one
    assert s.tasks[1].state == "ready"
    out = lend_a_while(s)
    assert of(StartExtraWorker, out) == [StartExtraWorker("x1", {"pin": 1}, "a")]
    assert not of(StartExtraWorker, lend_a_while(s))  # one is starting already
    out = s.handle(WorkerJoined("x1", resources={"pin": 1}))
    assert [(d.worker, d.task) for d in of(Dispatch, out)] == [("x1", 1)]
    assert s.workers["x1"].extra and s.workers["x1"].standin_for == "a"
    finish(s, 1, "x1")
    assert "x1" in s.workers  # idle, but a still waits: x1 stays a while for more
    out = s.handle(remote_call(("c", 3), resources={"pin": 1}))
    assert [(d.worker, d.task) for d in of(Dispatch, out)] == [("x1", 2)]
    finish(s, 2, "x1")
    # a's task goes on: x1 stands in for nobody, and as it is idle it retires
    out = s.handle(resumed("a", 0))
    assert of(RetireWorker, out) == [RetireWorker("x1")]
    assert "x1" not in s.workers and not s.extras


def test_a_busy_extra_worker_takes_no_new_work_once_the_waiting_worker_goes_on():
    s = SchedulerState(validate=True, max_extra_workers=2)
    s.handle(WorkerJoined("a"))
    calls(s, 1, 2)
    block(s, "a", 0)
    assert of(StartExtraWorker, lend_a_while(s))
    out = s.handle(WorkerJoined("x1"))
    assert [d.task for d in of(Dispatch, out)] == [1]
    out = s.handle(resumed("a", 0))
    assert not of(RetireWorker, out)  # it is busy: it finishes first
    out = s.handle(remote_call(("c", 3)))
    assert [d.worker for d in of(Dispatch, out)] == ["a"]
    out = finish(s, 1, "x1")
    assert of(RetireWorker, out) == [RetireWorker("x1")]


def test_a_worker_waiting_again_before_its_extra_worker_joined_gets_that_one():
    s = SchedulerState(validate=True, max_extra_workers=3)
    s.handle(WorkerJoined("a"))
    calls(s, 1, 3)
    block(s, "a", 0)
    assert of(StartExtraWorker, lend_a_while(s)) == [StartExtraWorker("x1", {}, "a")]
    s.handle(resumed("a", 0))
    block(s, "a", 0)
    assert not of(StartExtraWorker, lend_a_while(s))  # x1 is on its way
    out = s.handle(WorkerJoined("x1"))
    assert s.workers["x1"].standin_for == "a" and {d.worker for d in of(Dispatch, out)} == {"x1"}


def test_a_spare_extra_worker_is_reused_and_retired_after_its_idle_time():
    s = SchedulerState(validate=True, max_extra_workers=1)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    calls(s, 1, 5)  # a runs 0 (2 queued), b runs 1 (3 queued), 4 waits
    block(s, "a", 0)
    assert of(StartExtraWorker, lend_a_while(s)) == [StartExtraWorker("x1", {}, "a")]
    s.handle(WorkerJoined("x1"))
    assert s.workers["x1"].processing == {2, 4}
    finish(s, 2, "x1")
    finish(s, 4, "x1")
    s.handle(blocked("b", 1))
    out = s.handle(resumed("a", 0))
    assert not of(RetireWorker, out)  # a spare now, while b's task waits
    s.handle(remote_call(("c", 6)))  # a takes it: a is full again
    assert s.workers["a"].processing == {0, 5}
    # b hands back its queued task: the spare stands in for b at once
    out = s.handle(TaskReleased(3, "b"))
    assert not of(StartExtraWorker, out) and [d.worker for d in of(Dispatch, out)] == ["x1"]
    assert s.workers["x1"].standin_for == "b"
    finish(s, 3, "x1")
    idle_from = s.now
    assert not of(RetireWorker, s.handle(Tick(idle_from + EXTRA_IDLE_SECONDS / 2)))
    out = s.handle(Tick(idle_from + 1.5 * EXTRA_IDLE_SECONDS))
    assert of(RetireWorker, out) == [RetireWorker("x1")]
    assert s.workers["b"].stand_in is None


def test_an_extra_worker_holding_the_only_copy_of_a_needed_result_is_not_retired():
    s = SchedulerState(validate=True, max_extra_workers=1)
    s.handle(WorkerJoined("a"))
    calls(s, 1, 2)
    block(s, "a", 0)
    lend_a_while(s)
    s.handle(WorkerJoined("x1"))
    s.handle(TaskFinished(1, "x1", INLINE_THRESHOLD * 10, None, 0.001))  # large: kept there
    out = s.handle(resumed("a", 0))
    assert not of(RetireWorker, out)
    assert not of(RetireWorker, s.handle(Tick(s.now + 2 * EXTRA_IDLE_SECONDS)))
    out = s.handle(RefsChanged([], [("c", 2, 0)], "c"))  # the driver drops its ref
    assert FreeObjects("x1", (1,)) in out and of(RetireWorker, out) == [RetireWorker("x1")]


def test_extra_workers_are_capped_and_no_more_start_once_they_keep_dying():
    s = SchedulerState(validate=True, max_extra_workers=1)
    s.handle(WorkerJoined("a"))
    s.handle(WorkerJoined("b"))
    calls(s, 1, 6)
    block(s, "a", 0)
    block(s, "b", 1)
    started = of(StartExtraWorker, lend_a_while(s))
    assert [x.worker for x in started] == ["x1"]  # two workers wait: the cap is one
    for _ in range(10):  # each dies starting: the next starts at once, for a while
        more = of(StartExtraWorker, s.handle(WorkerLost(started[-1].worker, "exited: 1")))
        if not more:
            break
        started += more
    assert [x.worker for x in started] == ["x1", "x2", "x3"]  # 3 failures in a row: no more
    assert not of(StartExtraWorker, lend_a_while(s))
    assert not s.extras and not s.extras_starting


def test_an_actor_waiting_in_get_is_not_lent_out():
    s = SchedulerState(validate=True, max_extra_workers=2)
    s.handle(WorkerJoined("w"))
    s.handle(GraphSubmitted(("c", 1), ["A.__init__"], [()], [0], [b"init"], {}, [0],
                            fail_fast=False, create_actor={"id": "A1"}))
    s.handle(WorkerJoined("p", actor="A1"))
    finish(s, 0, "p")
    s.handle(GraphSubmitted(("c", 2), ["A.m"], [()], [0], [b"m"], {}, [0], fail_fast=False,
                            actor="A1"))
    calls(s, 3, 5)
    out = s.handle(blocked("p", 1)) + lend_a_while(s)
    assert not of(StartExtraWorker, out) and not s.blocked


def test_calls_made_inside_tasks_carry_how_deep_they_are():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    out = s.handle(remote_call(("c", 1)))
    assert of(Dispatch, out)[0].depth == 1
    caller = 0
    for level in range(2, 5):  # each call's task calls the next and waits for it
        out = s.handle(dataclasses.replace(remote_call((b"a", level)), parent=caller))
        out += block(s, "a", caller, (b"a", level, 0))
        (d,) = [d for d in of(Dispatch, out) if d.task == caller + 1]
        assert d.depth == level and d.parent == caller
        caller = d.task


def nested_calls(s):
    """A driver's call (task 0) that called a child (task 1), which called a
    grandchild (task 2); an unrelated call of the driver (task 3).  All dispatched
    (running, or queued on a busy worker); which worker has each."""
    s.handle(WorkerJoined("b"))
    s.handle(remote_call(("c", 1)))
    s.handle(dataclasses.replace(remote_call((b"a", 1)), parent=0))
    s.handle(dataclasses.replace(remote_call((b"b", 1)), parent=1))
    s.handle(remote_call(("c", 2)))
    assert all(s.tasks[t].state == "processing" for t in range(4))
    return {t: s.tasks[t].worker for t in range(4)}


def cancelled_tasks(out):
    return sorted(t for c in of(CancelTasks, out) for t in c.tasks)


def test_cancel_reaches_the_tasks_the_task_started_and_theirs():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    where = nested_calls(s)
    out = s.handle(CancelRef(("c", 1, 0)))
    assert cancelled_tasks(out) == [0, 1, 2]  # not 3: the task did not start it
    assert all(c.tasks == tuple(t for t in c.tasks if where[t] == c.worker)
               for c in of(CancelTasks, out))
    for t in (0, 1, 2):  # each fails as cancelled once its worker drops or stops it
        out = s.handle(TaskReleased(t, where[t]))
        assert [n.kind for n in of(NotifyRef, out)] == ["TaskCancelledError"]
    assert s.tasks[3].state == "processing"


def test_cancel_without_recursive_leaves_the_tasks_the_task_started():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    nested_calls(s)
    out = s.handle(CancelRef(("c", 1, 0), recursive=False))
    assert cancelled_tasks(out) == [0]


def test_force_cancel_fails_the_task_as_cancelled_when_its_worker_dies():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(remote_call(("c", 1)))
    assert of(CancelTasks, s.handle(CancelRef(("c", 1, 0), force=True))) == [
        CancelTasks("a", (0,), force=True)]
    out = s.handle(WorkerLost("a", "killed by signal 9"))
    (note,) = of(NotifyRef, out)
    assert note.kind == "TaskCancelledError" and "force=True" in note.message
    assert s.tasks[0].state == "erred"  # not run again, though it had retries left


def test_a_force_cancel_death_runs_the_other_tasks_of_the_worker_again_without_a_retry():
    """The worker ends itself for the cancelled task; tasks queued behind it there
    did nothing wrong and must not fail with WorkerCrashedError, retries or not."""
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(remote_call(("c", 1), max_retries=0))
    s.handle(remote_call(("c", 2), max_retries=0))
    assert s.tasks[1].worker == "a"  # queued on the one worker, behind task 0
    s.handle(CancelRef(("c", 1, 0), force=True))
    out = s.handle(WorkerLost("a", "killed by signal 9", force_cancelled=True))
    assert [n.kind for n in of(NotifyRef, out)] == ["TaskCancelledError"]
    assert s.tasks[1].state == "ready" and s.tasks[1].retries_left == 0
    out = s.handle(WorkerJoined("b"))  # the replacement takes it
    assert [d.task for d in of(Dispatch, out)] == [1]
    finish(s, 1, "b")
    assert 1 not in s.tasks or s.tasks[1].state != "erred"


def test_a_crash_with_a_force_cancel_pending_still_spends_retries():
    """Without the force-cancel exit (a real crash), the other tasks are crashes."""
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("a"))
    s.handle(remote_call(("c", 1), max_retries=0))
    s.handle(remote_call(("c", 2), max_retries=0))
    s.handle(CancelRef(("c", 1, 0), force=True))
    out = s.handle(WorkerLost("a", "exited with code 1"))
    kinds = sorted(n.kind for n in of(NotifyRef, out))
    assert kinds == ["TaskCancelledError", "WorkerCrashedError"]


def test_force_cancel_never_kills_an_actors_process():
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w"))
    s.handle(GraphSubmitted(("c", 1), ["A.__init__"], [()], [0], [b"init"], {}, [0],
                            fail_fast=False, create_actor={"id": "A1"}))
    s.handle(WorkerJoined("p", actor="A1"))
    finish(s, 0, "p")
    s.handle(GraphSubmitted(("c", 2), ["A.m"], [()], [0], [b"m"], {}, [0], fail_fast=False,
                            actor="A1"))
    out = s.handle(CancelRef(("c", 2, 0), force=True))
    assert of(CancelTasks, out) == [CancelTasks("p", (1,), force=False)]


def test_cancel_of_a_finished_task_does_nothing(s):
    s.handle(remote_call(("c", 1)))
    finish(s, 0, "a")
    for force in (False, True):
        assert s.handle(CancelRef(("c", 1, 0), force=force)) == []
    assert s.tasks[0].state == "memory"


def test_the_core_imports_nothing_that_does_io():
    """Every module of the core imports only its siblings and pure standard-library
    helpers: no sockets, pickle, threads or clock, so it stays testable as data."""
    allowed = {"__future__", "collections", "dataclasses", "heapq", "typing"}
    modules = sorted(pathlib.Path(sys.modules[SchedulerState.__module__].__file__).parent.glob("*.py"))
    assert len(modules) > 3
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def _one_worker_fan_in():
    state = SchedulerState(validate=True)
    state.handle(WorkerJoined("a"))
    # eight leaves feeding one sum; one slot: 1 running + 1 queued at first
    out = state.handle(graph([()] * 8 + [tuple(range(8))], wanted=[8]))
    assert [d.task for d in of(Dispatch, out)] == [0, 1]
    return state


def test_handle_all_is_handle_of_each_report_with_one_fill():
    """A worker's batch of reports is one step: every report is applied, in order,
    and the worker is filled at the end; the same tasks go out as when the
    reports are handled one by one, and the state ends the same."""
    one_by_one, batched = _one_worker_fan_in(), _one_worker_fan_in()
    # the worker reports, in one batch, every task it has been sent since its last
    batch_each, batch_all = [0, 1], [0, 1]
    sent_each, sent_all, rounds = [0, 1], [0, 1], 0
    while batch_all:
        rounds += 1
        out_each = [i for t in batch_each
                    for i in one_by_one.handle(TaskFinished(t, "a", 8, b"v%d" % t, 0.5))]
        out_all = batched.handle_all(
            [TaskFinished(t, "a", 8, b"v%d" % t, 0.5) for t in batch_all])
        batch_each = [d.task for d in of(Dispatch, out_each)]
        batch_all = [d.task for d in of(Dispatch, out_all)]
        sent_each += batch_each
        sent_all += batch_all
        if 8 in batch_all:  # the sum runs: each leaf was freed when the sum
            assert of(FreeObjects, out_all) == []  # ... finished, not before
    assert sorted(sent_all) == sorted(sent_each) == list(range(9))
    assert rounds == 5  # two tasks a batch (one running, one queued), then the sum
    assert of(ReportResult, out_all) == [ReportResult(G, 8, b"v8", None, 8)]
    assert sorted(o for f in of(FreeObjects, out_all) for o in f.objects) == list(range(8))
    assert batched.handle_all([]) == []
    for state in (one_by_one, batched):
        state.handle(GraphReleased(G))
        assert state.tasks == {} and state.graphs == {}


def test_quick_init_records_stay_frozen_dataclasses():
    """Dispatch, FreeObjects and TaskFinished get a faster __init__ (quick_init):
    the same fields, defaults, equality, hash and immutability as before."""
    from daskray.scheduler.events import quick_init

    d = Dispatch("w", 1, G, b"x", ())
    assert d == Dispatch(worker="w", task=1, graph=G, body=b"x", deps=(), notify=False,
                         parent=None, depth=1)
    assert hash(d) == hash(Dispatch("w", 1, G, b"x", (), False, None, 1))
    assert (d.notify, d.parent, d.depth) == (False, None, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.task = 2
    with pytest.raises(TypeError):
        Dispatch("w", 1)
    assert TaskFinished(3, "w", 8, None, 0.5).contained == ()
    assert dataclasses.astuple(FreeObjects("w", (1, 2))) == ("w", (1, 2))

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        items: list = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="default factory"):
        quick_init(WithFactory)
