"""Starting daskray's own processes and making sure none outlives its parent.

Processes are fresh interpreters (``python -m daskray.runtime.<role>``), never
forks: a forked child would inherit the driver's threads, locks and ZeroMQ
context.  Unlike ``multiprocessing``'s spawn they do not re-import the user's
``__main__``, so scripts need no ``if __name__ == "__main__"`` guard.

Configuration travels in the environment (``DASKRAY_CONFIG``, JSON), which only
the same user can read -- the session token is in it.  Every child watches its
parent through a pidfd and exits when the parent is gone, so a killed driver
leaves no orphans.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from typing import Any

from .transport import raise_open_files_limit

CONFIG_ENV = "DASKRAY_CONFIG"
#: one thread per numeric library in each process: the cluster already runs one
#: worker per core (dask.distributed's nanny does the same); a user's own setting wins
ONE_THREAD_ENV = {name: "1" for name in (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS")}


def spawn(module: str, config: dict[str, Any], output: Any = None,
          pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m module`` with ``config`` and this process's ``sys.path``;
    its stdout and stderr go to ``output`` (a file) if given, else to ours.
    ``env`` adds to (and overrides) this process's environment."""
    env = {**ONE_THREAD_ENV, **os.environ, **(env or {})}
    config = dict(config, sys_path=[p for p in sys.path if p], parent_pid=os.getpid())
    env[CONFIG_ENV] = json.dumps(config)
    return subprocess.Popen(
        [sys.executable, "-m", module],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        start_new_session=True,  # the terminal's Ctrl-C is the driver's business
        close_fds=True,
        pass_fds=pass_fds,
    )


def child_setup() -> dict[str, Any]:
    """Read the config, adopt the parent's ``sys.path``; call first thing in a child."""
    config = json.loads(os.environ.pop(CONFIG_ENV))
    for path in reversed(config.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_open_files_limit()  # every peer connection costs a file descriptor
    return config


def pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when process ``pid`` exits.

    ``None`` if the process is already gone or pidfds are not supported; callers
    then fall back to :func:`alive`.
    """
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie, exited but
    not yet reaped by its parent, counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def lock_held(path: str, exclusive: bool = False) -> bool:
    """Whether another process holds a lock (``flock``) on the file ``path`` that
    keeps this one from taking a shared one (``exclusive``: any lock at all).
    Liveness by lock: a pid can be reused, a lock dies with its holder.  A path
    that cannot be opened (or is a symlink) holds no lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (which releases a lock taken)
    return False


def describe_exit(returncode: int | None) -> str:
    """'exited with code 3' / 'was killed by SIGKILL' for error messages."""
    if returncode is None:
        return "stopped responding"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {returncode}"


#: the largest config passed on: one environment string may not exceed 128 KiB
MAX_INHERITED_CONFIG = 64 * 1024


def inherited_dask_config() -> dict[str, str]:
    """This process's dask config for the processes it starts, as dask.distributed
    hands it to its workers: dask reads ``DASK_INTERNAL_INHERIT_CONFIG`` when it
    is imported.  Values JSON cannot carry (functions, say) stay behind, and so
    does ``scheduler``: the driver's choice of scheduler ("daskray" included) is
    not one a task's own compute could use."""
    import warnings

    import dask.config

    config = {k: v for k, v in dask.config.config.items() if k != "scheduler"}
    text = dask.config.serialize(_json_safe(config))
    if len(text) > MAX_INHERITED_CONFIG:
        warnings.warn(f"the dask config is too large to pass to daskray's workers "
                      f"({len(text):,} bytes encoded); they start with their own",
                      RuntimeWarning, stacklevel=2)
        return {}
    return {"DASK_INTERNAL_INHERIT_CONFIG": text}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in ((str(k), _json_safe(v)) for k, v in value.items())
                if v is not _DROP}
    if isinstance(value, (list, tuple)):
        items = [_json_safe(v) for v in value]
        return _DROP if any(v is _DROP for v in items) else items
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return _DROP


_DROP = object()
