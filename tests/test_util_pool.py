"""daskray.util.multiprocessing.Pool against the standard library's
multiprocessing.Pool, on the same inputs: results, order, chunks, errors,
timeouts, initializer, close/join/terminate; on both backends."""

from __future__ import annotations

import multiprocessing
import os
import uuid

import pytest

import daskray
import daskray.util
from daskray.util.multiprocessing import Pool
from helpers import NUM_WORKERS, mark_started, wait_for_path, wait_until

pytestmark = [pytest.mark.usefixtures("cluster"), pytest.mark.timeout(120)]

#: what the tests' initializer sets in each pool process
OFFSET_VARIABLE = "DASKRAY_TEST_POOL_OFFSET"


@pytest.fixture(scope="module")
def std_pool():
    """The standard library's pool the results are compared with (spawned: no fork
    of a process that runs daskray's client threads)."""
    with multiprocessing.get_context("spawn").Pool(NUM_WORKERS) as pool:
        yield pool


def square(x):
    return x * x


def multiply(a, b):
    return a * b


def add(a, b=0, *, c=0):
    return a + b + c


def fails_on_seven(x):
    if x == 7:
        raise ValueError(f"seven is not allowed: {x}")
    return x


def pid_of(_):
    return os.getpid()


def set_offset(marks: str, offset: int) -> None:
    """The initializer: remember ``offset`` in this process, and say it ran."""
    os.environ[OFFSET_VARIABLE] = str(offset)
    open(os.path.join(marks, uuid.uuid4().hex), "w").close()


def plus_offset(x):
    return x + int(os.environ[OFFSET_VARIABLE])


def blocks_until(started: str, release: str, value):
    """Say it runs, then wait (at most 60 s) for ``release`` to exist."""
    mark_started(started)
    if not wait_until(lambda: os.path.exists(release), 60):
        raise TimeoutError(f"{release} never appeared")
    return value


def blocks_until_packed(args):
    return blocks_until(*args)


def touch(path: str) -> str:
    mark_started(path)
    return path


def outcomes(iterator) -> list:
    """Every ``next()`` of ``iterator`` until StopIteration: values, and errors as
    (type, args), so two iterators can be compared."""
    found = []
    while True:
        try:
            found.append(next(iterator))
        except StopIteration:
            return found
        except Exception as error:
            found.append((type(error), error.args))


def test_map_and_starmap_equal_the_standard_librarys(backend, std_pool):
    pairs = [(i, i + 1) for i in range(30)]
    with Pool(NUM_WORKERS) as pool:
        for chunksize in (None, 1, 4, 100):
            assert pool.map(square, range(50), chunksize) == std_pool.map(square, range(50),
                                                                          chunksize)
            assert pool.starmap(multiply, pairs, chunksize) == std_pool.starmap(multiply, pairs,
                                                                                chunksize)
        assert pool.map(square, []) == std_pool.map(square, []) == []
        assert pool.map(square, (x for x in range(5))) == [0, 1, 4, 9, 16]
        got = []
        result = pool.map_async(square, range(10), callback=got.append)
        assert result.get(timeout=30) == std_pool.map_async(square, range(10)).get(30)
        assert got == [result.get()] and result.ready() and result.successful()
        assert pool.starmap_async(multiply, pairs).get(30) == std_pool.starmap(multiply, pairs)


def test_imap_keeps_the_order_and_imap_unordered_returns_every_result(backend, std_pool):
    with Pool(NUM_WORKERS) as pool:
        for chunksize in (1, 3):
            assert list(pool.imap(square, range(20), chunksize)) == \
                list(std_pool.imap(square, range(20), chunksize))
            assert sorted(pool.imap_unordered(square, range(20), chunksize)) == \
                sorted(std_pool.imap_unordered(square, range(20), chunksize))
        it = pool.imap(square, range(3))
        assert [it.next(timeout=30) for _ in range(3)] == [0, 1, 4]
        with pytest.raises(StopIteration):
            it.next(timeout=30)
        assert list(pool.imap(square, [])) == list(std_pool.imap(square, [])) == []
        with pytest.raises(ValueError, match="Chunksize must be 1"):
            pool.imap(square, range(3), 0)


def test_apply_and_apply_async_equal_the_standard_librarys(backend, std_pool):
    with Pool(NUM_WORKERS) as pool:
        assert pool.apply(add, (1, 2), {"c": 3}) == std_pool.apply(add, (1, 2), {"c": 3}) == 6
        assert pool.apply(add, (5,)) == 5
        got = []
        result = pool.apply_async(add, (2,), {"b": 3}, callback=got.append)
        result.wait(timeout=30)
        assert result.ready() and result.successful() and result.get() == 5 and got == [5]


def test_errors_are_raised_in_the_caller_as_the_standard_library_raises_them(backend, std_pool):
    with Pool(NUM_WORKERS) as pool:
        for run in (lambda p: p.map(fails_on_seven, range(20)),
                    lambda p: p.map(fails_on_seven, range(20), 3),
                    lambda p: p.apply(fails_on_seven, (7,)),
                    lambda p: p.starmap(fails_on_seven, [(7,)])):
            with pytest.raises(ValueError) as ours:
                run(pool)
            with pytest.raises(ValueError) as theirs:
                run(std_pool)
            assert ours.value.args == theirs.value.args == ("seven is not allowed: 7",)

        errors = []
        result = pool.apply_async(fails_on_seven, (7,), error_callback=errors.append)
        result.wait(timeout=30)
        assert result.ready() and not result.successful()
        assert len(errors) == 1 and isinstance(errors[0], ValueError)
        with pytest.raises(ValueError, match="seven"):
            result.get()
        failed = pool.map_async(fails_on_seven, range(10), error_callback=errors.append)
        failed.wait(timeout=30)
        assert not failed.successful() and isinstance(errors[1], ValueError)

        # imap raises each error at its place and goes on (chunks of 1); in chunks,
        # the failed chunk ends the iteration, as the standard library's does
        for chunksize in (1, 3):
            assert outcomes(pool.imap(fails_on_seven, range(10), chunksize)) == \
                outcomes(std_pool.imap(fails_on_seven, range(10), chunksize))
        assert outcomes(pool.imap(fails_on_seven, range(10)))[7] == \
            (ValueError, ("seven is not allowed: 7",))


def test_a_chunk_runs_in_one_process(backend, std_pool):
    with Pool(NUM_WORKERS) as pool:
        for p in (pool, std_pool):
            pids = p.map(pid_of, range(12), chunksize=4)
            assert [len(set(pids[i:i + 4])) for i in range(0, 12, 4)] == [1, 1, 1]
            assert os.getpid() not in pids


def test_the_initializer_runs_once_in_each_process_before_its_tasks(backend, tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    spawn = multiprocessing.get_context("spawn")
    std_pool = spawn.Pool(2, initializer=set_offset, initargs=(str(theirs), 100))
    expected = std_pool.map(plus_offset, range(10))
    std_pool.close()
    std_pool.join()  # each process ran its initializer once, tasks or not
    with Pool(2, initializer=set_offset, initargs=(str(ours), 100)) as pool:
        assert pool.map(plus_offset, range(10)) == expected == list(range(100, 110))
        assert pool.apply(plus_offset, (1,)) == 101
    assert len(list(ours.iterdir())) == len(list(theirs.iterdir())) == 2


def test_an_initializer_that_fails_fails_the_pool(backend):
    with pytest.raises(ZeroDivisionError):
        Pool(1, initializer=divmod, initargs=(1, 0))


def test_get_and_next_time_out_as_the_standard_librarys(backend, std_pool, tmp_path):
    with Pool(NUM_WORKERS) as pool:
        for p, name in ((pool, "ours"), (std_pool, "theirs")):
            started, release = tmp_path / f"{name}-started", tmp_path / f"{name}-release"
            result = p.apply_async(blocks_until, (str(started), str(release), 42))
            wait_for_path(started)
            with pytest.raises(multiprocessing.TimeoutError):
                result.get(timeout=0.2)
            assert not result.ready()
            with pytest.raises(ValueError, match="not ready"):
                result.successful()
            release.touch()
            assert result.get(timeout=30) == 42

            started, release = tmp_path / f"{name}-imap-started", tmp_path / f"{name}-imap-release"
            it = p.imap(blocks_until_packed, [(str(started), str(release), 7)])
            wait_for_path(started)
            with pytest.raises(multiprocessing.TimeoutError):
                it.next(timeout=0.2)
            release.touch()
            assert it.next(timeout=30) == 7
            with pytest.raises(StopIteration):
                it.next(timeout=30)


def test_close_then_join_waits_for_the_work_given(backend, std_pool, tmp_path):
    pool = Pool(NUM_WORKERS)
    with pytest.raises(ValueError, match="Pool is still running"):
        pool.join()
    results = [pool.apply_async(touch, (str(tmp_path / f"done-{i}"),)) for i in range(6)]
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, range(3))
    pool.join()
    assert all(r.ready() and r.successful() for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"done-{i}" for i in range(6)]


def test_terminate_stops_pending_work(backend, tmp_path):
    pool = Pool(1)
    started, release = tmp_path / "started", tmp_path / "release"
    running = pool.apply_async(blocks_until, (str(started), str(release), "finished"))
    pending = [pool.apply_async(touch, (str(tmp_path / f"ran-{i}"),)) for i in range(3)]
    mapped = pool.map_async(touch, [str(tmp_path / "ran-map")])
    wait_for_path(started)
    pool.terminate()
    release.touch()  # the running task, were it still running, would now return
    for result in (running, *pending, mapped):
        with pytest.raises(daskray.ActorDiedError, match="terminated"):
            result.get(timeout=30)
    pool.join()
    assert not list(tmp_path.glob("ran-*"))
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply(square, (2,))


def test_a_with_block_terminates_the_pool(backend, tmp_path):
    with Pool(1) as pool:
        started, release = tmp_path / "started", tmp_path / "release"
        running = pool.apply_async(blocks_until, (str(started), str(release), 1))
        wait_for_path(started)
    with pytest.raises(daskray.ActorDiedError, match="terminated"):
        running.get(timeout=30)
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, [1])


def test_arguments_are_checked_as_the_standard_library_checks_them(backend):
    spawn = multiprocessing.get_context("spawn")
    for ours, theirs in ((lambda: Pool(0), lambda: spawn.Pool(0)),
                         (lambda: Pool(1, initializer=3), lambda: spawn.Pool(1, initializer=3))):
        with pytest.raises((ValueError, TypeError)) as std_error:
            theirs()
        with pytest.raises(type(std_error.value), match=str(std_error.value)):
            ours()
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(1, maxtasksperchild=5)


def test_processes_default_to_the_clusters_cpus(backend):
    with Pool() as pool:
        assert len(pool._processes) == int(daskray.cluster_resources()["CPU"]) == NUM_WORKERS
        assert sorted(pool.map(square, range(8))) == [x * x for x in range(8)]


def test_actor_pool_is_under_rays_path():
    assert daskray.util.ActorPool is daskray.ActorPool
