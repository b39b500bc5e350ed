"""A replica's Prometheus metrics, mirrored into Ray's metrics so one scrape sees every replica.

Behind Serve's proxy, ``GET /metrics`` reaches one replica picked at random, so it cannot
describe the deployment. Ray already exports metrics from every actor through the metrics
agent of its node (``http://<node>:<metrics-export-port>/metrics``), and Serve's metric
types tag each sample with its ``application``, ``deployment`` and ``replica``. Every few
seconds this copies each ``diffpo_*`` sample of the replica's own registry into a Serve
gauge of the same name (exported as ``ray_diffpo_*``): counters stay cumulative and
histogram buckets keep their ``le`` label, so ``sum by (le) (rate(...))`` and
``histogram_quantile`` work across replicas as usual.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry
from ray.serve.metrics import Gauge

PREFIX = "diffpo_"


class RayMetricsMirror:
    """Copies ``registry``'s ``diffpo_*`` samples into Ray every ``interval`` seconds."""

    def __init__(self, registry: CollectorRegistry, interval: float = 2.0) -> None:
        self.registry = registry
        self.interval = interval
        self.gauges: dict[str, Gauge] = {}
        self.task: asyncio.Task | None = None

    def push(self) -> None:
        for family in self.registry.collect():
            for sample in family.samples:
                if not sample.name.startswith(PREFIX) or sample.name.endswith("_created"):
                    continue
                gauge = self.gauges.get(sample.name)
                if gauge is None:
                    gauge = Gauge(sample.name, description=family.documentation, tag_keys=tuple(sorted(sample.labels)))
                    self.gauges[sample.name] = gauge
                gauge.set(sample.value, tags=dict(sample.labels))

    async def run(self) -> None:
        while True:
            self.push()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="diffpo-ray-metrics")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
