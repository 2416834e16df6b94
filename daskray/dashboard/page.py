"""The dashboard's page: one Bokeh document per browser tab, redrawn from the
shared :class:`~.model.DashboardModel` every :data:`REDRAW_MS`.

Every model the page updates has a ``name`` (the tables ``workers``,
``progress``, ``store``, ``actors`` and their sources ``<table>_source``; the
plot ``task_stream`` and its source ``task_stream_source``; the ``status`` line),
so a test or a user's script can find it with
``Bokeh.documents[0].get_model_by_name(...)``.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

from bokeh.layouts import column, row
from bokeh.models import (ColumnDataSource, DataTable, Div, FactorRange, HoverTool,
                          NumberFormatter, TableColumn)
from bokeh.palettes import Category20_20
from bokeh.plotting import figure

from ..runtime.task_events import key_prefix
from .model import DashboardModel

#: how often each open page is redrawn (ms): the browser's drawing competes with
#: the workers for the machine's cores (benchmarks/dashboard_overhead.py)
REDRAW_MS = 1000
#: task-stream bars a page holds (as dask's task stream: the newest thousand)
STREAM_BARS = 1000
#: seconds of the task stream shown (older bars scroll out)
STREAM_WINDOW = 60.0


def prefix_color(prefix: str) -> str:
    """A colour per task prefix, the same in every tab and every run."""
    return Category20_20[zlib.crc32(prefix.encode()) % len(Category20_20)]


def _table(name: str, columns: list[tuple[str, str, Any]], height: int, width: int) -> tuple:
    source = ColumnDataSource({field: [] for field, _, _ in columns}, name=f"{name}_source")
    table = DataTable(source=source, name=name, height=height, width=width,
                      index_position=None, columns=[
                          TableColumn(field=field, title=title,
                                      **({"formatter": fmt} if fmt is not None else {}))
                          for field, title, fmt in columns])
    return source, table


def _columns(rows: list[dict], fields: list[str]) -> dict[str, list]:
    return {f: [r[f] for r in rows] for f in fields}


def _show(table: DataTable, data: dict[str, list]) -> None:
    """Put ``data`` into ``table`` if it changed.  BokehJS redraws a table's rows
    only when its view's indices change, so a table whose row count stays is told
    to (its view's ``tags`` change: the rows are redrawn, not the whole table)."""
    if data == dict(table.source.data):
        return
    table.source.data = data
    table.view.tags = [table.view.tags[0] + 1 if table.view.tags else 1]


class Page:
    """One tab's document and what it has drawn so far."""

    def __init__(self, doc: Any, model: DashboardModel) -> None:
        self.model = model
        self.seq = 0  # the newest task-stream event drawn
        self.redraws = 0
        self.status = Div(name="status", text="waiting for the head's first snapshot")
        self.workers, self.workers_table = _table("workers", [
            ("id", "worker", None), ("kind", "kind", None), ("pid", "pid", None),
            ("cpu", "CPU %", NumberFormatter(format="0.0")),
            ("memory_mb", "memory (MB)", NumberFormatter(format="0.0")),
            ("current_text", "current task", None), ("queue", "queued", None)], 180, 860)
        self.stream = ColumnDataSource({"worker": [], "start": [], "end": [], "color": [],
                                        "prefix": [], "key": []}, name="task_stream_source")
        self.stream_plot = figure(
            name="task_stream", title="Task stream", height=260, sizing_mode="stretch_width",
            y_range=FactorRange(factors=[]), x_axis_label="seconds since the dashboard started",
            tools="xpan,xwheel_zoom,reset", toolbar_location="above")
        self.stream_plot.hbar(y="worker", left="start", right="end", height=0.8, color="color",
                              source=self.stream, line_color=None)
        self.stream_plot.add_tools(HoverTool(tooltips=[("task", "@key"), ("worker", "@worker")]))
        self.progress, self.progress_table = _table("progress", [
            ("prefix", "task prefix", None), ("done", "done", None),
            ("running", "running", None), ("waiting", "waiting", None),
            ("erred", "erred", None), ("percent", "% done", NumberFormatter(format="0.0"))], 180, 620)
        self.progress_plot = figure(
            name="progress_plot", title="% done by task prefix", height=200, width=480,
            y_range=FactorRange(factors=[]), x_range=(0, 100),
            toolbar_location=None)
        self.progress_plot.hbar(y="prefix", right="percent", height=0.7, color="color",
                                source=self.progress)
        self.store, self.store_table = _table("store", [
            ("kind", "object store", None), ("mb", "MB", NumberFormatter(format="0.0"))], 110, 240)
        self.actors, self.actors_table = _table("actors", [
            ("id", "actor", None), ("name", "name", None), ("state", "state", None),
            ("queue", "queued calls", None), ("restarts", "restarts", None),
            ("worker", "worker", None)], 150, 860)
        doc.title = "daskray dashboard"
        doc.add_root(column(
            Div(text="<h2>daskray</h2>"), self.status,
            row(column(Div(text="<b>Workers</b>"), self.workers_table),
                column(Div(text="<b>Object store</b>"), self.store_table)),
            self.stream_plot,
            row(column(Div(text="<b>Progress</b>"), self.progress_table), self.progress_plot),
            Div(text="<b>Actors</b>"), self.actors_table, sizing_mode="stretch_width"))
        self.redraw()
        doc.add_periodic_callback(self.redraw, REDRAW_MS)

    def redraw(self) -> None:
        """Draw what the model holds now (tables replaced, new stream bars added)."""
        m = self.model
        self.redraws += 1
        workers = m.worker_rows()
        for w in workers:
            w["memory_mb"] = w["memory"] / 2**20
        _show(self.workers_table, _columns(workers, ["id", "kind", "pid", "cpu", "memory_mb",
                                                     "current_text", "queue"]))
        self._draw_stream([w["id"] for w in workers if not w["extra"]])
        progress = m.progress()
        for p in progress:
            p["percent"] = 100.0 * p["fraction"]
            p["color"] = prefix_color(p["prefix"])
        _show(self.progress_table, _columns(progress, ["prefix", "done", "running", "waiting",
                                                       "erred", "percent", "color"]))
        self.progress_plot.y_range.factors = [p["prefix"] for p in progress]
        _show(self.store_table, {
            "kind": ["used", "limit", "spilled"],
            "mb": [m.store[k] / 2**20 for k in ("used", "limit", "spilled")]})
        _show(self.actors_table, _columns(m.actors, ["id", "name", "state", "queue",
                                                     "restarts", "worker"]))
        self.status.text = (
            f"{sum(1 for w in workers if w['kind'] == 'task')} task workers · "
            f"{sum(p['done'] for p in progress)} tasks done · "
            f"redraw {self.redraws} at {time.strftime('%H:%M:%S')}")

    def _draw_stream(self, workers: list[str]) -> None:
        new = self.model.events_after(self.seq)[-STREAM_BARS:]
        if new:
            self.seq = new[-1][0]
            origin = self.model.started
            prefixes = [key_prefix(e[1]) for e in new]
            self.stream.stream({
                "worker": [e[2] for e in new], "start": [e[3] - origin for e in new],
                "end": [e[4] - origin for e in new], "color": [prefix_color(p) for p in prefixes],
                "prefix": prefixes, "key": [e[1] for e in new]}, rollover=STREAM_BARS)
        factors = sorted(set(workers) | set(self.stream.data["worker"]))
        if list(self.stream_plot.y_range.factors) != factors:
            self.stream_plot.y_range.factors = factors
        if self.stream.data["end"]:
            end = max(self.stream.data["end"][-200:])
            self.stream_plot.x_range.start = max(0.0, end - STREAM_WINDOW)
            self.stream_plot.x_range.end = end + 0.5
