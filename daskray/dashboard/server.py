"""The dashboard's process: a Bokeh server on loopback with the page at ``/`` and
Prometheus metrics at ``/metrics``, fed by the head's snapshots.

Started by the head (:class:`DashboardProcess`), stopped by it at shutdown, and
gone on its own when the head is: it watches its parent.  Once it listens, it
writes ``{"url": ...}`` (or ``{"error": ...}`` if it could not start) to
``dashboard.json`` in the session directory, where ``init()`` reads the URL.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

URL_FILE = "dashboard.json"
#: seconds between two measurements of the workers' CPU and memory and the store
MEASURE_SECONDS = 1.0
#: seconds ``init()`` waits for the dashboard to listen
START_TIMEOUT = 60.0


# ---------------------------------------------------------------- the head's side

class DashboardProcess:
    """The dashboard's process and the head's snapshot publisher (used by the head)."""

    def __init__(self, ctx: Any, config: dict) -> None:
        from ..runtime.process import spawn
        from ..runtime.transport import ipc_address
        from .snapshot import SnapshotPublisher

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


def wait_for_url(session_dir: str, alive: Any, timeout: float = START_TIMEOUT) -> str:
    """The dashboard's URL, once it listens (the driver calls this in ``init``).
    Raises ``ClusterError`` if it failed to start, or the cluster ``alive()`` no
    longer is, or it takes longer than ``timeout``."""
    from ..errors import ClusterError

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


# ---------------------------------------------------------------- the dashboard's process

def free_port(wanted: int) -> int:
    """``wanted`` if it is free on loopback, else a random free port."""
    for port in (wanted, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


class Feed:
    """Reads the head's snapshots into the model, and measures what the head does
    not: the workers' CPU and memory (psutil) and the object store's files."""

    def __init__(self, ctx: Any, config: dict, model: Any) -> None:
        import zmq

        from ..runtime.store_memory import HostStore

        self.zmq = zmq
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(config["snapshots"])
        self.model = model
        self.store = HostStore(config["store_prefix"], config["session_dir"],
                               config["store_limit"])
        self.processes: dict[int, Any] = {}

    def drain(self) -> None:
        """Apply every snapshot that has arrived, oldest first."""
        while True:
            try:
                data = self.sock.recv(self.zmq.NOBLOCK)
            except self.zmq.Again:
                return
            self.model.apply(pickle.loads(data))

    def measure(self) -> None:
        """Measure the workers' CPU and memory and the object store's use."""
        import psutil

        usage = {}
        for w in self.model.workers:
            proc = self.processes.get(w["pid"])
            try:
                if proc is None:
                    proc = self.processes[w["pid"]] = psutil.Process(w["pid"])
                usage[w["pid"]] = (proc.cpu_percent(None), proc.memory_info().rss)
            except psutil.Error:
                self.processes.pop(w["pid"], None)
        for pid in set(self.processes) - set(usage):
            del self.processes[pid]
        self.model.measured_usage(usage)
        try:
            spilled = set(os.listdir(self.store.spill_dir))
        except OSError:
            spilled = set()
        self.model.measured_store(self.store.stats(), spilled)


def serve(config: dict) -> None:
    """Run the dashboard until the head stops it or is gone."""
    import zmq
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.server import Server
    from tornado.ioloop import IOLoop, PeriodicCallback
    from tornado.web import RequestHandler

    from .metrics import metrics_text
    from .model import DashboardModel
    from .page import Page

    model = DashboardModel(started=time.time())
    ctx = zmq.Context()
    feed = Feed(ctx, config, model)

    class Metrics(RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.write(metrics_text(model))

    port = free_port(config["port"])
    server = Server({"/": Application(FunctionHandler(lambda doc: Page(doc, model)))},
                    address="127.0.0.1", port=port, io_loop=IOLoop.current(),
                    allow_websocket_origin=[f"127.0.0.1:{port}", f"localhost:{port}"],
                    extra_patterns=[(r"/metrics", Metrics)])
    server.start()
    loop = IOLoop.current()
    parent = config["parent_pid"]

    def watch_parent() -> None:
        if os.getppid() != parent:
            loop.stop()

    PeriodicCallback(feed.drain, 100).start()
    PeriodicCallback(feed.measure, MEASURE_SECONDS * 1000).start()
    PeriodicCallback(watch_parent, 500).start()
    signal.signal(signal.SIGTERM, lambda *_: loop.add_callback_from_signal(loop.stop))
    _write_url_file(config["session_dir"], {"url": f"http://127.0.0.1:{port}/"})
    try:
        loop.start()
    finally:
        server.stop()
        ctx.destroy(0)


def _write_url_file(session_dir: str, info: dict) -> None:
    """Write ``dashboard.json`` whole (a reader never sees half of it)."""
    path = os.path.join(session_dir, URL_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    from ..runtime.process import child_setup

    config = child_setup()
    try:
        serve(config)
    except Exception as exc:  # noqa: BLE001 - init() must hear why, not wait
        traceback.print_exc()
        _write_url_file(config["session_dir"], {"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
