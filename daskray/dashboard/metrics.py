"""Prometheus metrics at ``/metrics``, read from the dashboard's model on each scrape.

A custom collector (prometheus-client's way for values kept elsewhere): each
scrape turns the model's current numbers into metric families, so nothing is
counted twice and the head does no work for it.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.exposition import generate_latest

from .model import DURATION_BUCKETS, DashboardModel

#: the task states ``daskray_tasks`` always reports (0 when none)
TASK_STATES = ("waiting", "running", "memory", "erred")


class ModelCollector:
    """Metric families from a :class:`DashboardModel` (see the module)."""

    def __init__(self, model: DashboardModel) -> None:
        self.model = model

    def collect(self) -> Iterator[Any]:
        m = self.model
        tasks = GaugeMetricFamily("daskray_tasks", "Tasks the head holds, by state",
                                  labels=["state"])
        for state in sorted(set(TASK_STATES) | set(m.task_states)):
            tasks.add_metric([state], m.task_states.get(state, 0))
        yield tasks
        yield self._durations()
        store = GaugeMetricFamily("daskray_store_bytes", "The object store's bytes",
                                  labels=["kind"])
        for kind in ("used", "limit", "spilled"):
            store.add_metric([kind], m.store.get(kind, 0))
        yield store
        yield CounterMetricFamily("daskray_spills", "Objects spilled to disk", value=m.spills)
        yield CounterMetricFamily("daskray_worker_restarts",
                                  "Task workers lost and replaced", value=m.worker_restarts)
        yield GaugeMetricFamily("daskray_workers", "Task workers in the cluster",
                                value=sum(1 for w in m.workers
                                          if w["joined"] and not w["actor"] and not w["extra"]))

    def _durations(self) -> HistogramMetricFamily:
        hist = HistogramMetricFamily("daskray_task_duration_seconds",
                                     "How long tasks ran, by task prefix", labels=["prefix"])
        for prefix, counts in sorted(self.model.durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(DURATION_BUCKETS, counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            hist.add_metric([prefix], buckets, sum_value=self.model.duration_sums[prefix])
        return hist


def metrics_text(model: DashboardModel) -> bytes:
    """The Prometheus text exposition of ``model``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ModelCollector(model))
    return generate_latest(registry)
