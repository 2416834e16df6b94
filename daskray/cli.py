"""The ``daskray`` command: start, inspect and stop clusters that outlive a script.

::

    daskray start --head [--num-workers N] [--resources JSON] [--object-store-memory SIZE]
    daskray status
    daskray stop

``start --head`` starts a cluster on this machine and returns once its workers
are up, printing the address to give ``daskray.init(address=...)`` (or use
``address="auto"``, or set ``DASKRAY_ADDRESS``).  Drivers that join share its
workers, objects and named actors; ``daskray.shutdown()`` in a driver only
disconnects it.  ``stop`` stops every such cluster of this user.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from typing import Sequence

from .api import _store_limit
from .errors import ClusterError
from .runtime import standalone
from .runtime.cluster import START_TIMEOUT_SECONDS, make_session_dir
from .runtime.process import pidfd, spawn
from .runtime.status import query_worker_status
from .runtime.store_memory import HostStore

STOP_TIMEOUT_SECONDS = 30.0


def _parse_resources(text: str | None, num_workers: int) -> list | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"daskray start: --resources is not JSON: {exc}") from None
    if isinstance(value, dict):
        return [value] * num_workers
    if isinstance(value, list) and len(value) == num_workers and all(
            isinstance(v, dict) for v in value):
        return value
    raise SystemExit("daskray start: --resources must be a JSON object, or a list of one "
                     "object per worker")


def start(args: argparse.Namespace) -> int:
    if not args.head:
        print("daskray start: only --head is supported: daskray's own cluster runs on one "
              "machine. To use many machines, start a dask.distributed cluster "
              "(`dask scheduler`, `dask worker tcp://HOST:8786` on each host) and call "
              "daskray.init(address=\"tcp://HOST:8786\")", file=sys.stderr)
        return 2
    num_workers = args.num_workers if args.num_workers is not None else os.cpu_count() or 1
    if num_workers < 1:
        print("daskray start: --num-workers must be at least 1", file=sys.stderr)
        return 2
    resources = _parse_resources(args.resources, num_workers)
    try:
        store_limit = _store_limit(args.object_store_memory)
    except ValueError as exc:
        print(f"daskray start: {exc}", file=sys.stderr)
        return 2
    session_dir = make_session_dir()
    log_path = os.path.join(session_dir, standalone.LOG_FILE)
    ready_r, ready_w = os.pipe()
    # private from the start: tasks' output goes there, and it may outlive the session
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(log_fd, "w") as log:
        owner = spawn("daskray.runtime.standalone", {
            "num_workers": num_workers, "resources": resources, "store_limit": store_limit,
            "session_dir": session_dir, "ready_fd": ready_w,
        }, output=log, pass_fds=(ready_w,))
    os.close(ready_w)
    answer = _read_answer(ready_r, START_TIMEOUT_SECONDS + 10)
    if not answer.startswith("ready "):
        if owner.poll() is None:
            owner.kill()
        owner.wait()
        print(f"daskray start: the cluster did not start ({answer or 'no answer'})",
              file=sys.stderr)
        try:
            with open(log_path) as f:
                sys.stderr.write(f.read()[-4000:])
        except OSError:
            pass
        shutil.rmtree(session_dir, ignore_errors=True)
        return 1
    address = answer.split(" ", 1)[1]
    print(f"daskray: started a cluster of {num_workers} workers (owner pid {owner.pid}).\n"
          f"  address: {address}\n"
          f"  join it from Python:  daskray.init(address={address!r})  or  address='auto'\n"
          f"  log: {log_path}\n"
          f"  stop it:  daskray stop")
    return 0


def _read_answer(fd: int, timeout: float) -> str:
    """The owner's one-line answer on its readiness pipe ('' if it closed it first)."""
    import select

    deadline = time.monotonic() + timeout
    data = b""
    try:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return "timed out"
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace").strip()


def status(args: argparse.Namespace) -> int:
    clusters, malformed = standalone.scan_clusters()
    for log in standalone.crash_logs():
        print(f"a cluster stopped without being asked to; its log: {log}")
    for exc in malformed:
        print(f"daskray status: {exc}", file=sys.stderr)
    if not clusters:
        print("daskray: no running cluster (start one with `daskray start --head`)")
        return 1
    for info in clusters:
        stats = HostStore(info["shm_prefix"], info["session_dir"], info["store_limit"]).stats()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        print(f"cluster {info['address']}\n"
              f"  started {started}, owner pid {info['owner_pid']}, head pid "
              f"{info['head_pid']}, {info['num_workers']} workers"
              + (f", resources {info['resources']}" if info.get("resources") else "") + "\n"
              f"  object store: {stats['used'] / 2**20:.1f} MiB of "
              f"{stats['limit'] / 2**20:.0f} MiB in {stats['objects']} objects, "
              f"{stats['spilled'] / 2**20:.1f} MiB spilled\n"
              f"  log: {info['log']}")
        _print_workers(info)
    return 0


def _print_workers(info: dict) -> None:
    """One line per worker of the cluster: what it runs now and how many tasks wait."""
    try:
        workers = query_worker_status(info["address"], bytes.fromhex(info["token"]))
    except ClusterError as exc:
        print(f"  workers: unknown ({exc})")
        return
    print("  workers:")
    for wid, w in workers.items():
        kind = f"actor {w['actor']}" if w.get("actor") else "extra" if w.get("extra") \
            else "worker"
        task = w["task"] if w["task"] is not None else "idle"
        print(f"    {wid} ({kind}, pid {w.get('pid')}): running {task}, "
              f"{w['queued']} queued")


def stop(args: argparse.Namespace) -> int:
    clusters, malformed = standalone.scan_clusters()
    for exc in malformed:
        print(f"daskray stop: {exc}", file=sys.stderr)
    if not clusters:
        print("daskray: no running cluster to stop")
        return 1 if malformed else 0
    for info in clusters:
        if standalone.owner_alive(info["session_dir"]):  # so the pid is still the owner's
            try:
                os.kill(info["owner_pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    code = 0
    for info in clusters:
        while standalone.owner_alive(info["session_dir"]) and time.monotonic() < deadline:
            time.sleep(0.05)  # the owner is not our child: its lock tells when it is gone
        if not standalone.owner_alive(info["session_dir"]):
            # its files are gone; the process itself may still be exiting
            _wait_exit(info["owner_pid"], deadline)
            print(f"daskray: stopped the cluster at {info['address']}")
            continue
        print(f"daskray stop: the cluster at {info['address']} did not stop within "
              f"{STOP_TIMEOUT_SECONDS:.0f} s; killing it", file=sys.stderr)
        for pid in (info["head_pid"], info["owner_pid"]):  # workers follow their head
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_exit(info["owner_pid"], time.monotonic() + 5)
        shutil.rmtree(info["session_dir"], ignore_errors=True)
        shutil.rmtree(standalone.shm_dir_of(info), ignore_errors=True)
        code = 1
    return 1 if malformed else code


def _wait_exit(pid: int, deadline: float) -> None:
    """Wait until process ``pid`` (not our child) exits, or the deadline passes."""
    import select

    fd = pidfd(pid)
    if fd is None:  # gone already, or no pidfds here
        return
    try:
        select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="daskray", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("start", help="start a cluster on this machine")
    p.add_argument("--head", action="store_true", help="start the head (and its workers)")
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--num-workers", "--num-cpus", type=int, dest="num_workers",
                   help="worker processes (default: the number of cores)")
    p.add_argument("--resources", help='custom resources, JSON: {"gpu": 1}, or a list of '
                                       "one object per worker")
    p.add_argument("--object-store-memory", help="the shared-memory store's limit: bytes, "
                                                 "or e.g. '4 GiB' (default 30%% of RAM)")
    p.set_defaults(run=start)
    p = commands.add_parser("status", help="list this user's running clusters")
    p.set_defaults(run=status)
    p = commands.add_parser("stop", help="stop this user's running clusters")
    p.set_defaults(run=stop)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ClusterError as exc:
        print(f"daskray {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
