"""Ray's API as Ray users reach for it: ``ActorPool`` (also ``daskray.util.ActorPool``),
named actors (namespaces, ``util.list_named_actors``, taken names, ``get_if_exists``,
``kill(no_restart=False)``, fate sharing), ``init(num_cpus=0)``, a float
``object_store_memory``, ``ObjectID``, and auto-init (the first call starts a cluster).

Tests that apply to both backends take the ``backend`` fixture (daskray's own
runtime, then a dask.distributed cluster).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest

import daskray
import daskray.api
import daskray.util
from helpers import start_cluster

pytestmark = pytest.mark.usefixtures("cluster")


@daskray.remote
class Worker:
    """An actor for the pool: doubles values, can wait for a file, returns pairs."""

    def double(self, v):
        return 2 * v

    def double_when(self, v, path):
        """2*v once ``path`` exists: the test decides when the call finishes."""
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return 2 * v

    @daskray.method(num_returns=2)
    def pair(self, v):
        return v, -v

    def pid(self):
        return os.getpid()


# =========================================================================== ActorPool


def test_actor_pool_is_under_rays_path():
    assert daskray.util.ActorPool is daskray.ActorPool


@pytest.mark.timeout(60)
def test_actor_pool_map_never_yields_an_earlier_submits_result(backend):
    pool = daskray.util.ActorPool([Worker.remote(), Worker.remote()])
    pool.submit(lambda a, v: a.double.remote(v), 100)
    pool.submit(lambda a, v: a.double.remote(v), 200)
    assert list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3])) == [2, 4, 6]
    pool.submit(lambda a, v: a.double.remote(v), 300)
    assert sorted(pool.map_unordered(lambda a, v: a.double.remote(v), [4, 5])) == [8, 10]
    assert not pool.has_next()


@pytest.mark.timeout(60)
def test_actor_pool_push_pop_idle_and_has_free(backend):
    a, b = Worker.remote(), Worker.remote()
    pool = daskray.util.ActorPool([a])
    pool.submit(lambda actor, v: actor.double.remote(v), 1)
    assert not pool.has_free()
    assert pool.pop_idle() is None  # the only actor is busy until its result is taken
    pool.submit(lambda actor, v: actor.double.remote(v), 2)  # waits for an actor
    pool.push(b)  # takes the waiting call at once
    assert not pool.has_free()
    assert [pool.get_next(), pool.get_next()] == [2, 4]
    assert pool.has_free()
    with pytest.raises(ValueError, match="belongs to this ActorPool"):
        pool.push(a)
    popped = {pool.pop_idle(), pool.pop_idle()}
    assert popped == {a, b}
    assert pool.pop_idle() is None and not pool.has_free()


@pytest.mark.timeout(60)
def test_actor_pool_empty_pool_grows_with_push(backend):
    pool = daskray.util.ActorPool([])
    assert not pool.has_free() and not pool.has_next()
    pool.submit(lambda actor, v: actor.double.remote(v), 21)  # waits for an actor
    pool.push(Worker.remote())
    assert pool.get_next() == 42


@pytest.mark.timeout(60)
def test_actor_pool_methods_with_two_returns(backend):
    pool = daskray.util.ActorPool([Worker.remote(), Worker.remote()])
    assert list(pool.map(lambda a, v: a.pair.remote(v), [1, 2, 3])) == \
        [[1, -1], [2, -2], [3, -3]]
    assert sorted(pool.map_unordered(lambda a, v: a.pair.remote(v), [4, 5])) == \
        [[4, -4], [5, -5]]


@pytest.mark.timeout(60)
def test_actor_pool_get_next_timeout_keeps_the_call(backend, tmp_path):
    gate = str(tmp_path / "gate")
    pool = daskray.util.ActorPool([Worker.remote()])
    pool.submit(lambda a, v: a.double_when.remote(v, gate), 5)
    with pytest.raises(TimeoutError):
        pool.get_next(timeout=0.2)
    with pytest.raises(TimeoutError):
        pool.get_next_unordered(timeout=0.2)
    assert pool.has_next()
    open(gate, "w").close()
    assert pool.get_next(timeout=30) == 10
    assert not pool.has_next()


@pytest.mark.timeout(60)
def test_actor_pool_get_next_unordered_gives_the_first_finished(backend, tmp_path):
    gate = str(tmp_path / "gate")
    pool = daskray.util.ActorPool([Worker.remote(), Worker.remote()])
    pool.submit(lambda a, v: a.double_when.remote(v, gate), 1)  # held back
    pool.submit(lambda a, v: a.double.remote(v), 2)
    assert pool.get_next_unordered(timeout=30) == 4
    open(gate, "w").close()
    assert pool.get_next_unordered(timeout=30) == 2
    with pytest.raises(StopIteration):
        pool.get_next_unordered()


@pytest.mark.timeout(60)
def test_actor_pool_get_next_after_get_next_unordered_gives_the_earliest_left(backend, tmp_path):
    gate = str(tmp_path / "gate")
    pool = daskray.util.ActorPool([Worker.remote(), Worker.remote()])
    pool.submit(lambda a, v: a.double_when.remote(v, gate), 1)  # held back
    pool.submit(lambda a, v: a.double.remote(v), 2)
    assert pool.get_next_unordered(timeout=30) == 4
    open(gate, "w").close()
    assert pool.get_next(timeout=30) == 2
    assert not pool.has_next()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unordered", [False, True])
def test_actor_pool_ignore_if_timedout_drops_the_timed_out_call(backend, tmp_path, unordered):
    gate = str(tmp_path / "gate")
    pool = daskray.util.ActorPool([Worker.remote()])
    take = pool.get_next_unordered if unordered else pool.get_next
    pool.submit(lambda a, v: a.double_when.remote(v, gate), 5)
    pool.submit(lambda a, v: a.double.remote(v), 7)  # waits for the only actor
    with pytest.raises(TimeoutError):
        take(timeout=0.2, ignore_if_timedout=False)
    assert pool.has_next()
    with pytest.raises(TimeoutError, match="dropped"):
        take(timeout=0.2, ignore_if_timedout=True)
    # the dropped call's actor took the waiting call; it runs after the dropped one
    open(gate, "w").close()
    assert take(timeout=30, ignore_if_timedout=True) == 14
    assert not pool.has_next()


# =========================================================================== small API


@daskray.remote
def one():
    return 1


@daskray.remote
def fails(message):
    raise ValueError(message)


@daskray.remote
def when_exists(path, value):
    """``value`` once ``path`` exists (at most 60 s)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


@pytest.mark.timeout(60)
def test_ref_future_and_as_future(backend, tmp_path):
    """Ray's ``ref.future()`` (concurrent.futures) and ``ref.as_future()`` (asyncio)."""
    assert one.remote().future().result(timeout=30) == 1
    with pytest.raises(ValueError, match="boom"):
        fails.remote("boom").future().result(timeout=30)
    gate = str(tmp_path / "gate")
    held = when_exists.remote(gate, "late")

    async def main():
        assert await one.remote().as_future() == 1
        assert await asyncio.wrap_future(one.remote().future()) == 1
        with pytest.raises(ValueError, match="boom"):
            await fails.remote("boom").as_future()
        future = held.as_future()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(future, timeout=0.1)
        assert future.cancelled()
        open(gate, "w").close()
        return await asyncio.wait_for(held.as_future(), timeout=30)

    assert asyncio.run(main()) == "late"  # the cancelled future left the task alone


def test_object_id_is_object_ref():
    assert daskray.ObjectID is daskray.ObjectRef
    assert isinstance(daskray.put(1), daskray.ObjectID)


@pytest.mark.timeout(60)
def test_init_with_no_cpus_starts_no_worker(restart_cluster):
    import numpy as np
    import psutil

    daskray.shutdown()
    daskray.init(num_cpus=0, _validate=True)
    head = psutil.Process(daskray.api._runtime.cluster.head.pid)
    assert head.children() == []
    big = np.arange(1_000_000)
    assert daskray.get(daskray.put(3), timeout=10) == 3
    assert np.array_equal(daskray.get(daskray.put(big), timeout=10), big)
    pending = one.remote()  # no worker will run it
    assert daskray.wait([pending], timeout=0.5) == ([], [pending])
    with pytest.raises(daskray.GetTimeoutError):
        daskray.get(pending, timeout=0.2)


@pytest.mark.timeout(60)
def test_init_takes_a_float_object_store_memory(restart_cluster):
    daskray.shutdown()
    daskray.init(num_workers=1, object_store_memory=2.5e8)
    assert daskray.object_store_stats()["limit"] == 250_000_000
    daskray.shutdown()
    with pytest.raises(ValueError, match="positive number of bytes"):
        daskray.init(num_workers=1, object_store_memory=0.5)
    assert not daskray.is_initialized()


# =========================================================================== auto-init

#: a driver that never calls init(): the entry point named by argv[1] starts daskray
AUTO_INIT_SCRIPT = textwrap.dedent("""
    import os, sys
    import dask
    import daskray

    @daskray.remote
    def pid():
        return os.getpid()

    @daskray.remote
    class Box:
        def pid(self):
            return os.getpid()

    def lookup():
        try:
            daskray.get_actor("auto-init-nobody")
        except ValueError:
            pass

    ENTRIES = {
        "put": lambda: daskray.get(daskray.put(1), timeout=60),
        "remote": lambda: daskray.get(pid.remote(), timeout=60),
        "actor": lambda: daskray.get(Box.remote().pid.remote(), timeout=60),
        "get": lambda: daskray.get([], timeout=60),
        "wait": lambda: daskray.wait([daskray.put(1)], timeout=60),
        "get_actor": lookup,
    }

    # these need a running cluster and start none
    for call in (daskray.cluster_resources, daskray.nodes, daskray.get_runtime_context):
        try:
            call()
        except daskray.ClusterError:
            pass
    assert not daskray.is_initialized()
    ENTRIES[sys.argv[1]]()
    assert daskray.is_initialized()
    # not dask's default scheduler: dask's own runs this in this process
    assert dask.config.get("scheduler", None) is None
    assert dask.delayed(os.getpid)().compute() == os.getpid()
    runtime = daskray.api._runtime
    print(runtime.context.backend, runtime.cluster and runtime.cluster.head.pid, os.getpid(),
          flush=True)
    if sys.argv[2:] == ["shutdown"]:  # after shutdown() no call starts one again
        daskray.shutdown()
        try:
            daskray.put(1)
        except daskray.ClusterError:
            print("stays down", flush=True)
    # else shut down at exit, as after init()
""")

ENTRY_POINTS = ["put", "remote", "actor", "get", "wait", "get_actor"]


def _driver(*args, env=None):
    """Run AUTO_INIT_SCRIPT with ``args`` in a fresh interpreter: its output lines."""
    env = {**{k: v for k, v in os.environ.items() if k != "DASKRAY_ADDRESS"},
           "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", AUTO_INIT_SCRIPT, *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_first_call_starts_daskray_without_making_it_dasks_scheduler(entry):
    import psutil

    backend, head, driver = _driver(entry)[0].split()
    assert backend == "local"
    # shut down at exit: no head left, nor its shared memory
    assert not psutil.pid_exists(int(head)) or \
        psutil.Process(int(head)).status() == psutil.STATUS_ZOMBIE
    assert not [e for e in os.listdir("/dev/shm") if e.startswith(f"daskray-{driver}-")]


@pytest.mark.timeout(120)
def test_after_shutdown_no_call_starts_daskray_again():
    assert _driver("put", "shutdown")[1] == "stays down"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("entry", ["put", "actor"])
def test_auto_init_joins_the_dask_cluster_of_daskray_address(dask_cluster, entry):
    out = _driver(entry, env={"DASKRAY_ADDRESS": dask_cluster.scheduler_address})
    assert out[0].split()[0] == "distributed"


# =========================================================================== named actors


@daskray.remote
class Named:
    def __init__(self, tag=None):
        self.tag = tag
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n

    def pid(self):
        return os.getpid()

    def make(self, name):
        """Create a named actor from this actor's code (it ends with this one)."""
        Named.options(name=name).remote("child")
        return True


@daskray.remote
def make_named(name, lifetime=None):
    """Create a named actor from a task's code; the task then ends."""
    Named.options(name=name, lifetime=lifetime).remote("from a task")
    return True


@daskray.remote
def find(name, namespace=None):
    """From a task: whether ``name`` is found in ``namespace`` (None: its driver's), and
    the names of its driver's namespace (None when ``namespace`` is given)."""
    found = daskray.get_actor(name, namespace=namespace, _missing_ok=True) is not None
    return found, daskray.util.list_named_actors() if namespace is None else None


def _alive(name, namespace=None):
    return daskray.get_actor(name, namespace=namespace, _missing_ok=True) is not None


@pytest.mark.timeout(60)
def test_a_taken_name_raises_value_error_at_creation(backend):
    first = Named.options(name="compat-taken").remote(1)
    with pytest.raises(ValueError, match="compat-taken.*exists already"):
        Named.options(name="compat-taken").remote(2)
    same = Named.options(name="compat-taken", get_if_exists=True).remote(3)
    assert same == first and daskray.get(same.incr.remote(), timeout=30) == 1
    daskray.kill(first)
    again = Named.options(name="compat-taken").remote(4)  # a dead actor frees its name
    assert again != first
    daskray.kill(again)


@pytest.mark.timeout(60)
def test_names_are_unique_within_a_namespace_and_listed(backend):
    a = Named.options(name="compat-n", namespace="compat-ns-a").remote()
    b = Named.options(name="compat-n", namespace="compat-ns-b").remote()
    mine = Named.options(name="compat-mine").remote()
    try:
        assert a != b
        assert daskray.get_actor("compat-n", namespace="compat-ns-b") == b
        with pytest.raises(ValueError, match="compat-n"):
            daskray.get_actor("compat-n")  # not in this driver's namespace
        names = daskray.util.list_named_actors()
        assert "compat-mine" in names and "compat-n" not in names
        everywhere = daskray.util.list_named_actors(all_namespaces=True)
        assert {"name": "compat-n", "namespace": "compat-ns-a"} in everywhere
        assert {"name": "compat-n", "namespace": "compat-ns-b"} in everywhere
        (own,) = [e["namespace"] for e in everywhere if e["name"] == "compat-mine"]
        assert own.startswith("anonymous-")  # Ray's anonymous namespace of this driver
        # a task looks names up in its driver's namespace
        found, listed = daskray.get(find.remote("compat-mine"), timeout=30)
        assert found and "compat-mine" in listed
        assert daskray.get(find.remote("compat-n"), timeout=30)[0] is False
        assert daskray.get(find.remote("compat-n", "compat-ns-a"), timeout=30)[0] is True
    finally:
        for handle in (a, b, mine):
            daskray.kill(handle)


@daskray.remote
def find_nested(name, namespace=None):
    """From a call made by a call: ``find`` one level deeper."""
    return daskray.get(find.remote(name, namespace), timeout=30)


@pytest.mark.timeout(60)
def test_a_nested_call_on_dask_names_its_namespace(on_distributed):
    """On the dask.distributed backend a call made by a call cannot tell its driver's
    namespace: without ``namespace=`` it says what to do; with it, it works."""
    handle = Named.options(name="compat-nested", namespace="compat-nested-ns").remote()
    try:
        with pytest.raises(daskray.ClusterError, match="pass namespace="):
            daskray.get(find_nested.remote("compat-nested"), timeout=30)
        found, _ = daskray.get(find_nested.remote("compat-nested", "compat-nested-ns"),
                               timeout=30)
        assert found
    finally:
        daskray.kill(handle)


NAMESPACE_DRIVER = textwrap.dedent("""
    import sys
    import daskray

    @daskray.remote
    class Keeper:
        def get(self):
            return "kept"

    daskray.init(address=sys.argv[1] if len(sys.argv) > 1 else None, namespace="compat-jobs")
    kept = Keeper.options(name="compat-kept", lifetime="detached").remote()
    fated = Keeper.options(name="compat-fated").remote()
    assert daskray.get([kept.get.remote(), fated.get.remote()], timeout=60) == ["kept"] * 2
    print(sorted(daskray.util.list_named_actors()), flush=True)
""")


@pytest.mark.timeout(180)
def test_another_drivers_namespace_and_its_actors_fate(on_distributed):
    """A driver with ``init(namespace=...)`` ends: its detached actor lives on and is
    found in that namespace (not in this driver's); its other actor ended with it.
    (On daskray's own runtime a second driver needs ``daskray start``: the driver's
    end is checked on the scheduler core, below.)"""
    proc = subprocess.run([sys.executable, "-c", NAMESPACE_DRIVER,
                           on_distributed.scheduler_address], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['compat-fated', 'compat-kept']"
    assert not _alive("compat-kept")
    kept = daskray.get_actor("compat-kept", namespace="compat-jobs")
    assert daskray.get(kept.get.remote(), timeout=30) == "kept"
    assert not _alive("compat-fated", namespace="compat-jobs")
    daskray.kill(kept)
    assert not _alive("compat-kept", namespace="compat-jobs")


@pytest.mark.timeout(60)
def test_init_namespace_is_where_the_drivers_names_are(restart_cluster):
    daskray.shutdown()
    start_cluster(namespace="compat-init-ns")
    handle = Named.options(name="compat-in-ns").remote()
    assert {"name": "compat-in-ns", "namespace": "compat-init-ns"} in \
        daskray.util.list_named_actors(all_namespaces=True)
    assert daskray.get_actor("compat-in-ns", namespace="compat-init-ns") == handle
    assert daskray.get(find.remote("compat-in-ns"), timeout=30)[0] is True
    assert daskray.get_runtime_context().namespace == "compat-init-ns"
    assert daskray.get_runtime_context().get()["namespace"] == "compat-init-ns"
    with pytest.raises(ValueError, match="namespace"):
        daskray.init(namespace="")  # checked before "init twice"
    with pytest.raises(TypeError, match="namespace must be a str"):
        daskray.init(namespace=123)


def test_the_runtime_context_tells_the_drivers_anonymous_namespace():
    namespace = daskray.get_runtime_context().namespace
    assert namespace.startswith("anonymous-")
    handle = Named.options(name="compat-anon").remote()
    try:
        assert {"name": "compat-anon", "namespace": namespace} in \
            daskray.util.list_named_actors(all_namespaces=True)
    finally:
        daskray.kill(handle)


@pytest.mark.timeout(60)
def test_names_and_namespaces_are_checked_as_rays(backend):
    """A name or namespace not a str: TypeError; an empty one: ValueError;
    ``namespace=None``: the driver's; ``get_if_exists`` needs a name."""
    for bad in (123, object()):
        with pytest.raises(TypeError, match="must be a str"):
            Named.options(namespace=bad)
        with pytest.raises(TypeError, match="must be a str"):
            Named.options(name=bad)
        with pytest.raises(TypeError, match="must be a str"):
            daskray.get_actor("compat-x", namespace=bad)
        with pytest.raises(TypeError, match="must be a str"):
            daskray.get_actor(bad)
    with pytest.raises(ValueError, match="must not be empty"):
        Named.options(namespace="")
    with pytest.raises(ValueError, match="needs the actor's name"):
        Named.options(num_cpus=1, get_if_exists=True)
    handle = Named.options(name="compat-none-ns", namespace=None).remote()
    try:
        assert daskray.get_actor("compat-none-ns") == handle
    finally:
        daskray.kill(handle)


@pytest.mark.timeout(60)
def test_kill_without_no_restart_restarts_the_actor(backend):
    actor = Named.options(max_restarts=1).remote()
    assert daskray.get([actor.incr.remote(), actor.incr.remote()], timeout=30) == [1, 2]
    if backend == "distributed":
        with pytest.raises(daskray.ClusterError, match="no_restart=False.*dask worker dies"):
            daskray.kill(actor, no_restart=False)
        daskray.kill(actor)
        return
    pid = daskray.get(actor.pid.remote(), timeout=30)
    daskray.kill(actor, no_restart=False)
    # a new process, its constructor run again; the call made meanwhile waited for it
    assert daskray.get(actor.incr.remote(), timeout=30) == 1
    assert daskray.get(actor.pid.remote(), timeout=30) != pid
    daskray.kill(actor, no_restart=False)  # no restart left: it ends for good
    with pytest.raises(daskray.ActorDiedError):
        daskray.get(actor.incr.remote(), timeout=30)


@pytest.mark.timeout(60)
def test_a_named_actor_ends_with_the_task_that_created_it(backend):
    if backend == "distributed":
        with pytest.raises(daskray.ClusterError, match="lifetime='detached'"):
            daskray.get(make_named.remote("compat-task-fated"), timeout=30)
        return
    assert daskray.get(make_named.remote("compat-task-fated"), timeout=30)
    assert not _alive("compat-task-fated")
    assert daskray.get(make_named.remote("compat-task-kept", "detached"), timeout=30)
    kept = daskray.get_actor("compat-task-kept")  # a detached one lives on
    assert daskray.get(kept.incr.remote(), timeout=30) == 1
    daskray.kill(kept)


@pytest.mark.timeout(60)
def test_an_actor_ends_with_the_actor_that_created_it(backend):
    parent = Named.remote()
    if backend == "distributed":
        with pytest.raises(daskray.ClusterError, match="lifetime='detached'"):
            daskray.get(parent.make.remote("compat-child"), timeout=30)
        daskray.kill(parent)
        return
    assert daskray.get(parent.make.remote("compat-child"), timeout=30)
    child = daskray.get_actor("compat-child")
    assert daskray.get(child.incr.remote(), timeout=30) == 1
    daskray.kill(parent)
    assert not _alive("compat-child")
    with pytest.raises(daskray.ActorDiedError, match="created it"):
        daskray.get(child.incr.remote(), timeout=30)


def test_a_drivers_actors_end_with_it_unless_detached():
    """The scheduler core: a driver's end (ClientLost) ends the actors it created,
    named or not, except detached ones; its namespace is forgotten."""
    from daskray.scheduler import SchedulerState
    from daskray.scheduler.events import ClientLost, ClientNamespace, GraphSubmitted, \
        WorkerJoined
    from daskray.scheduler.instructions import StopActor

    def create(gid, actor_id, **options):
        return GraphSubmitted(gid, ["init"], [()], [0], [b"body"], {}, [0], fail_fast=False,
                              create_actor={"id": actor_id, "detached": True, **options})

    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w1"))
    s.handle(ClientNamespace(b"driver", "jobs"))
    s.handle(create((b"driver", 1), "A", name="fated"))
    s.handle(create((b"driver", 2), "B", name="kept", lifetime="detached"))
    s.handle(create((b"other", 1), "C", name="fated"))  # another namespace: ""
    assert set(s.actor_names) == {("jobs", "fated"), ("jobs", "kept"), ("", "fated")}
    out = s.handle(ClientLost(b"driver"))
    assert [i.actor for i in out if isinstance(i, StopActor)] == ["A"]
    assert set(s.actor_names) == {("jobs", "kept"), ("", "fated")}
    assert b"driver" not in s.namespaces



def test_a_named_actor_ends_when_the_run_of_its_task_ends_even_if_it_runs_again():
    """The scheduler core: a task made a named actor, then its worker died; the task
    runs again (max_retries), and the actor of its first run has ended, so the second
    run may take the name again."""
    from daskray.scheduler import SchedulerState
    from daskray.scheduler.events import GraphSubmitted, WorkerJoined, WorkerLost
    from daskray.scheduler.instructions import Dispatch, StopActor

    s = SchedulerState(validate=True)
    s.handle(WorkerJoined("w1"))
    s.handle(WorkerJoined("w2"))
    out = s.handle(GraphSubmitted((b"driver", 1), ["task"], [()], [0], [b"body"], {}, [0],
                                  fail_fast=False, max_retries=1))
    (run,) = [i for i in out if isinstance(i, Dispatch)]
    s.handle(GraphSubmitted((run.worker.encode(), 1), ["init"], [()], [0], [b"body"], {}, [0],
                            fail_fast=False, parent=run.task,
                            create_actor={"id": "A", "name": "made", "detached": True}))
    assert ("", "made") in s.actor_names
    out = s.handle(WorkerLost(run.worker, "killed"))
    assert [i.actor for i in out if isinstance(i, StopActor)] == ["A"]
    assert ("", "made") not in s.actor_names
    assert [i.task for i in out if isinstance(i, Dispatch)] == [run.task]  # runs again
