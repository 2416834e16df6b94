"""The scheduler core's side of actor calls sent straight to the actor's process,
as plain data: the caller's registration (``GraphSubmitted.direct``) and the
process's report of the outcome (``DirectCallDone``) may come in either order; a
call registered for a process that is gone runs again through the head or
fails; callers are told when the process goes (``ActorMoved``)."""

from __future__ import annotations

from daskray.scheduler import SchedulerState
from daskray.scheduler.actors import direct_key
from daskray.scheduler.events import (
    CancelRef, ClientLost, DirectCallDone, GraphSubmitted, KillActor, RefsChanged, Subscribe,
    WatchActor, WorkerJoined, WorkerLost,
)
from daskray.scheduler.instructions import (
    ActorMoved, CancelTasks, Dispatch, FreeObjects, NotifyRef, StartActor,
)
from daskray.scheduler.model import ERRED, MEMORY, PROCESSING

C = b"c"
CREATION = (C, 1, 0)


def of(kind, instructions):
    return [i for i in instructions if isinstance(i, kind)]


def call(number, direct=None, client=C, retries=0):
    """A call of actor A, as a driver registers it (``direct``: the process it
    was sent to straight)."""
    return GraphSubmitted((client, number), ["A.f"], [()], [0], [b"body"], {}, [0],
                          fail_fast=False, pinned=[CREATION], actor="A", max_retries=retries,
                          direct=direct)


def done(number, worker="a1", inline=b"v", client=C, **kw):
    ref = (client, number, 0)
    return DirectCallDone(ref, worker, direct_key(ref), 8, inline, 0.001, **kw)


def placed_actor(max_restarts=0, max_task_retries=0):
    """A state with a worker, actor A alive on process a1 (its constructor done)."""
    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w1"))
    s.handle(GraphSubmitted((C, 1), ["A.__init__"], [()], [0], [b"init"], {}, [0],
                            fail_fast=False, max_retries=0,
                            create_actor={"id": "A", "max_restarts": max_restarts,
                                          "max_task_retries": max_task_retries}))
    (dispatch,) = of(Dispatch, s.handle(WorkerJoined("a1", actor="A")))
    s.handle(_finished(dispatch.task, "a1"))
    assert s.tasks[dispatch.task].state == MEMORY
    return s


def _finished(task, worker):
    from daskray.scheduler.events import TaskFinished

    return TaskFinished(task, worker, 8, b"None", 0.001)


def task_of(s, number, client=C):
    return s.tasks[s.refs[(client, number, 0)]]


def test_a_registered_direct_call_runs_on_its_process_and_nothing_is_dispatched():
    s = placed_actor()
    out = s.handle(call(2, direct="a1"))
    assert not of(Dispatch, out)
    ts = task_of(s, 2)
    assert ts.state == PROCESSING and ts.worker == "a1" and ts.direct
    assert ts.store_key == direct_key((C, 2, 0))
    assert ts.id in s.actors["A"].in_flight and ts.id in s.workers["a1"].processing
    # someone else asks for it; the owner has the outcome from the process already
    s.handle(Subscribe(b"other", [(C, 2, 0)]))
    out = s.handle(done(2, inline=b"42"))
    assert ts.state == MEMORY and ts.id not in s.actors["A"].in_flight
    assert [(n.to, n.inline) for n in of(NotifyRef, out)] == [(b"other", b"42")]
    # the caller drops its ref: freed where it is kept, under its direct key
    out = s.handle(RefsChanged([(C, 2, 0)], [], C))
    out = s.handle(RefsChanged([], [(C, 2, 0)], C))
    assert FreeObjects("a1", (direct_key((C, 2, 0)),)) in out
    assert (C, 2, 0) not in s.refs and s.sizes()["early direct outcomes"] == 0


def test_an_outcome_that_comes_before_its_registration_waits_for_it():
    s = placed_actor()
    assert s.handle(done(2, inline=b"7")) == []
    assert s.sizes()["early direct outcomes"] == 1
    out = s.handle(call(2, direct="a1"))
    ts = task_of(s, 2)
    assert ts.state == MEMORY and ts.inline == b"7"
    assert s.sizes()["early direct outcomes"] == 0
    assert not of(Dispatch, out)
    assert not of(NotifyRef, out)  # the caller had the reply from the process
    # an error that comes first is kept the same way
    s.handle(done(3, inline=None, error=b"boom"))
    s.handle(call(3, direct="a1"))
    assert task_of(s, 3).state == ERRED and task_of(s, 3).failure[0] == b"boom"


def test_an_outcome_the_process_could_not_reply_reaches_the_caller_at_registration():
    s = placed_actor()
    s.handle(done(2, inline=b"7", replied=False))  # say, a value holding refs
    out = s.handle(call(2, direct="a1"))
    assert [(n.to, n.inline) for n in of(NotifyRef, out)] == [(C, b"7")]


def test_an_outcome_of_a_call_registered_and_forgotten_is_freed_not_kept():
    s = placed_actor()
    s.handle(call(2, direct="a1"))
    s.handle(done(2))
    s.handle(RefsChanged([(C, 2, 0)], [(C, 2, 0)], C))  # held and dropped: forgotten
    assert (C, 2, 0) not in s.refs
    out = s.handle(done(2))  # the same outcome again (a retry's, say)
    assert out == [FreeObjects("a1", (direct_key((C, 2, 0)),))]
    assert s.sizes()["early direct outcomes"] == 0


def test_a_call_sent_to_a_process_that_is_gone_runs_again_through_the_head():
    s = placed_actor(max_restarts=1, max_task_retries=1)
    s.handle(WatchActor(C, "A"))
    out = s.handle(WorkerLost("a1", "killed"))
    assert ActorMoved(C, "A") in out and of(StartActor, out)
    out = s.handle(call(2, direct="a1", retries=1))
    assert ActorMoved(C, "A") in out
    ts = task_of(s, 2)
    assert not ts.direct and ts.store_key == ts.id
    out = s.handle(WorkerJoined("a2", actor="A"))  # the constructor runs again first
    (ctor,) = of(Dispatch, out)
    out = s.handle(_finished(ctor.task, "a2"))
    assert [d.task for d in of(Dispatch, out)] == [ts.id]


def test_a_call_sent_to_a_process_that_is_gone_fails_without_retries():
    s = placed_actor(max_restarts=1)
    s.handle(WorkerLost("a1", "killed"))
    out = s.handle(call(2, direct="a1"))
    (note,) = [n for n in of(NotifyRef, out) if n.ref == (C, 2, 0)]
    assert note.kind == "ActorDiedError"
    assert ActorMoved(C, "A") in out


def test_direct_calls_in_flight_when_the_process_dies_fail_without_retries():
    s = placed_actor(max_restarts=1)
    s.handle(call(2, direct="a1"))
    out = s.handle(WorkerLost("a1", "SIGKILL"))
    assert ActorMoved(C, "A") in out  # the direct registration made it a watcher
    assert {n.ref: n.kind for n in of(NotifyRef, out)} == {(C, 2, 0): "ActorDiedError"}


def test_direct_calls_in_flight_when_the_process_dies_run_again_with_retries():
    s = placed_actor(max_restarts=1, max_task_retries=1)
    s.handle(call(2, direct="a1"))
    out = s.handle(WorkerLost("a1", "SIGKILL"))
    assert not of(NotifyRef, out)
    ts = task_of(s, 2)
    # the dead process's late outcome is of no use: not applied
    assert s.handle(done(2)) == [] and ts.state != MEMORY
    (ctor,) = of(Dispatch, s.handle(WorkerJoined("a2", actor="A")))
    (again,) = of(Dispatch, s.handle(_finished(ctor.task, "a2")))
    assert again.task == ts.id and not ts.direct  # through the head, under its task id
    s.handle(_finished(ts.id, "a2"))
    assert ts.state == MEMORY and ts.holders == {"a2"}


def test_cancel_of_a_direct_call_names_it_by_its_direct_key_and_the_owner_hears():
    s = placed_actor()
    s.handle(call(2, direct="a1"))
    out = s.handle(CancelRef((C, 2, 0)))
    assert CancelTasks("a1", (direct_key((C, 2, 0)),), False) in out
    out = s.handle(done(2, inline=None, released=True))  # dropped while queued there
    (note,) = of(NotifyRef, out)
    assert note.to == C and note.kind == "TaskCancelledError"


def test_kill_tells_the_watchers_and_later_registrations_fail():
    s = placed_actor()
    s.handle(WatchActor(C, "A"))
    s.handle(WatchActor(b"d", "A"))
    out = s.handle(KillActor("A"))
    assert set(of(ActorMoved, out)) == {ActorMoved(C, "A"), ActorMoved(b"d", "A")}
    out = s.handle(call(2, direct="a1"))
    (note,) = of(NotifyRef, out)
    assert note.kind == "ActorDiedError"
    assert s.actors["A"].direct_callers == set()


def test_a_lost_caller_leaves_no_early_outcome_behind():
    s = placed_actor()
    s.handle(done(5))
    s.handle(done(6, inline=None))
    assert s.sizes()["early direct outcomes"] == 2
    out = s.handle(ClientLost(C))
    assert set(of(FreeObjects, out)) >= {FreeObjects("a1", (direct_key((C, 5, 0)),)),
                                         FreeObjects("a1", (direct_key((C, 6, 0)),))}
    assert s.sizes()["early direct outcomes"] == 0
    assert s.handle(done(7)) == [FreeObjects("a1", (direct_key((C, 7, 0)),))]


def test_a_direct_registration_with_arguments_to_wait_for_goes_through_the_head():
    s = placed_actor()
    s.handle(GraphSubmitted((C, 2), ["x", "A.f"], [(), (0,)], [0, 1], [b"x", b"f"], {}, [1],
                            fail_fast=False, actor="A", max_retries=0, direct="a1"))
    assert not any(ts.direct for ts in s.tasks.values())


def test_a_call_through_the_head_waits_for_the_callers_direct_calls_before_it():
    s = placed_actor()
    s.handle(call(2, direct="a1"))
    s.handle(call(3, direct="a1"))
    out = s.handle(call(4))  # through the head (its arguments were refs, say)
    assert not of(Dispatch, out)  # 2 and 3 may not have reached the process yet
    assert not of(Dispatch, s.handle(call(5, client=b"other")))  # behind it, in order
    assert not of(Dispatch, s.handle(done(2)))
    out = s.handle(done(3))
    assert [d.task for d in of(Dispatch, out)] == [task_of(s, 4).id,
                                                   task_of(s, 5, client=b"other").id]


def test_the_owner_hears_of_a_result_holding_refs_from_the_head():
    s = placed_actor()
    s.handle(call(2, direct="a1"))
    out = s.handle(done(2, inline=b"[ref]", replied=False))
    assert [(n.to, n.inline) for n in of(NotifyRef, out)] == [(C, b"[ref]")]
    s.handle(done(3, inline=b"[ref]", replied=False))  # before its registration
    out = s.handle(call(3, direct="a1"))
    assert {(n.to, n.inline) for n in of(NotifyRef, out)} == {(C, b"[ref]")}
