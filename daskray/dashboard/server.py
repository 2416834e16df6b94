"""The dashboard's process (``python -m daskray.dashboard.server``): a Bokeh
server on loopback with the page at ``/`` and Prometheus metrics at
``/metrics``, fed by the head's snapshots.

Started by the head (:class:`~.process.DashboardProcess`), stopped by it at
shutdown, and gone on its own when the head is: it watches its parent.  Once it
listens, it writes ``{"url": ...}`` (or ``{"error": ...}`` if it could not
start) to ``dashboard.json`` in the session directory, where ``init()`` reads
the URL.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from typing import Any

import psutil
import zmq
from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.server.server import Server
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.web import RequestHandler

from ..runtime.process import child_setup
from ..runtime.store_memory import HostStore
from .metrics import metrics_text
from .model import DashboardModel
from .page import Page
from .process import URL_FILE

#: seconds between two measurements of the workers' CPU and memory and the store
MEASURE_SECONDS = 1.0


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

    def __init__(self, ctx: zmq.Context, config: dict, model: DashboardModel) -> None:
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
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.model.apply(pickle.loads(data))

    def measure(self) -> None:
        """Measure the workers' CPU and memory and the object store's use."""
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
    """Run the dashboard until the head stops it (SIGTERM) or is gone."""
    model = DashboardModel(started=time.time())
    ctx = zmq.Context()
    feed = Feed(ctx, config, model)
    feed.measure()  # the store's limit and use are there from the first page on

    class Metrics(RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.write(metrics_text(model))

    server, port = listen(config["port"], {
        "/": Application(FunctionHandler(lambda doc: Page(doc, model)))}, Metrics)
    server.start()
    loop = IOLoop.current()
    parent = config["parent_pid"]

    def watch_parent() -> None:
        if os.getppid() != parent:  # the head is gone: so is the cluster
            os._exit(0)

    PeriodicCallback(feed.drain, 100).start()
    PeriodicCallback(feed.measure, MEASURE_SECONDS * 1000).start()
    PeriodicCallback(watch_parent, 500).start()
    # the head stops it: nothing to save, and the session's files go with the session
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    _write_url_file(config["session_dir"], {"url": f"http://127.0.0.1:{port}/"})
    loop.start()


def listen(wanted: int, apps: dict, metrics: type) -> tuple[Server, int]:
    """A Bokeh server on 127.0.0.1: on port ``wanted`` if free, else on a random
    free one (tried again if another process takes it between look and bind)."""
    for attempt in range(5):
        port = free_port(wanted if attempt == 0 else 0)
        try:
            return Server(apps, address="127.0.0.1", port=port, io_loop=IOLoop.current(),
                          allow_websocket_origin=[f"127.0.0.1:{port}", f"localhost:{port}"],
                          extra_patterns=[(r"/metrics", metrics)]), port
        except OSError:
            continue
    raise OSError("found no free port on 127.0.0.1 for the dashboard")


def _write_url_file(session_dir: str, info: dict) -> None:
    """Write ``dashboard.json`` whole (a reader never sees half of it)."""
    path = os.path.join(session_dir, URL_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    config = child_setup()
    try:
        serve(config)
    except Exception as exc:  # noqa: BLE001 - init() must hear why, not wait
        traceback.print_exc()
        _write_url_file(config["session_dir"], {"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
