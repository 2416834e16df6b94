"""The dashboard's process as the head and the driver see it: the head starts
and stops it (:class:`DashboardProcess`, with the snapshot publisher), the
driver waits for its URL (:func:`wait_for_url`).  Imports nothing of Bokeh: the
head and the driver stay light; only the dashboard's own process
(:mod:`.server`) loads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Callable

import zmq

from ..errors import ClusterError
from ..runtime.process import spawn
from ..runtime.transport import ipc_address
from .snapshot import SnapshotPublisher

#: where the dashboard's process writes ``{"url": ...}`` or ``{"error": ...}``,
#: in the session directory
URL_FILE = "dashboard.json"
#: seconds ``init()`` waits for the dashboard to listen
START_TIMEOUT = 60.0


class DashboardProcess:
    """The dashboard's process and the head's snapshot publisher (used by the head)."""

    def __init__(self, ctx: zmq.Context, config: dict) -> None:
        address = ipc_address(config["session_dir"], "dashboard.sock")
        self.publisher = SnapshotPublisher(ctx, address)
        self.proc = spawn("daskray.dashboard.server", {
            "snapshots": address, "port": config["dashboard_port"],
            "session_dir": config["session_dir"], "store_prefix": config["store_prefix"],
            "store_limit": config["store_limit"]})

    def stop(self) -> None:
        """End the dashboard's process (politely, then by force) and the publisher."""
        self.publisher.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for_url(session_dir: str, alive: Callable[[], bool],
                 timeout: float = START_TIMEOUT) -> str:
    """The dashboard's URL, once it listens (the driver calls this in ``init``).
    Raises ``ClusterError`` if it failed to start, or the cluster ``alive()`` no
    longer is, or it takes longer than ``timeout``."""
    path = os.path.join(session_dir, URL_FILE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                info = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            if not alive():
                raise ClusterError("the cluster stopped before its dashboard started") from None
            time.sleep(0.05)  # polling a file another process writes: no event to wait on
            continue
        if "error" in info:
            raise ClusterError(f"the dashboard could not start: {info['error']}")
        return info["url"]
    raise ClusterError(f"the dashboard did not start within {timeout:.0f} s; start without "
                       "include_dashboard=True, or look at the error output above")
