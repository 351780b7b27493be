"""Experiment-level Prometheus gauges of the operator (`bfl run --metrics-port`).

The agents export what each device sees (edge_agent/metrics.py); the operator adds what only
it knows: the experiment's settings, which devices it made malicious (ground truth for the
detection rate), and the per-round outcome on the chain the honest devices agree on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from edge_agent.metrics import serve, stop_serving

#: Every metric family the orchestrator exports.
EXPERIMENT_METRICS = (
    "bfl_experiment_info",
    "bfl_experiment_devices",
    "bfl_experiment_malicious_devices",
    "bfl_experiment_device_malicious",
    "bfl_experiment_rounds",
    "bfl_experiment_round",
    "bfl_experiment_accuracy_ratio",
    "bfl_experiment_round_duration_seconds",
    "bfl_experiment_updates_total",
    "bfl_experiment_heads_agree",
    "bfl_experiment_finished",
)


class ExperimentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        run = ["run"]
        self.info = Gauge(
            "bfl_experiment_info",
            "The experiment's settings (value 1).",
            run + ["protocol", "model", "dataset", "partition", "aggregator", "vote_ref", "attack"],
            registry=r,
        )
        self.devices = Gauge("bfl_experiment_devices", "Devices admitted to the run.", run, registry=r)
        self.malicious = Gauge("bfl_experiment_malicious_devices", "Devices the operator made malicious.", run, registry=r)
        self.device_malicious = Gauge(
            "bfl_experiment_device_malicious",
            "1 for a device the operator made malicious (attack label), 0 for an honest one.",
            run + ["device", "attack"],
            registry=r,
        )
        self.rounds = Gauge("bfl_experiment_rounds", "Rounds the run is set to last.", run, registry=r)
        self.round = Gauge("bfl_experiment_round", "The last round whose block the honest devices reported.", run, registry=r)
        self.accuracy = Gauge(
            "bfl_experiment_accuracy_ratio", "Mean accuracy of G_j over the honest devices' test splits.", run, registry=r
        )
        self.duration = Gauge("bfl_experiment_round_duration_seconds", "Wall time of the last round.", run, registry=r)
        self.updates = Counter(
            "bfl_experiment_updates",
            "Local updates decided on the chain, by verdict and by the worker's true class.",
            run + ["verdict", "worker_class"],
            registry=r,
        )
        self.agree = Gauge("bfl_experiment_heads_agree", "1 when every honest device reported the same head.", run, registry=r)
        self.finished = Gauge("bfl_experiment_finished", "1 once the run's last round is in.", run, registry=r)
        self.server = None

    def serve(self, addr: str, port: int) -> None:
        self.server = serve(self.registry, addr, port)

    def started(self, run: str, cfg, devices: list[str], malicious: dict[str, str]) -> None:
        self.info.labels(run, cfg.protocol, cfg.model, cfg.dataset, cfg.partition, cfg.aggregator, cfg.vote_ref, cfg.attack).set(1)
        self.devices.labels(run).set(len(devices))
        self.malicious.labels(run).set(len(malicious))
        for d in devices:
            self.device_malicious.labels(run, d, malicious.get(d, "none")).set(1 if d in malicious else 0)
        self.rounds.labels(run).set(cfg.rounds)
        self.round.labels(run).set(0)
        self.finished.labels(run).set(0)
        for verdict in ("accepted", "rejected"):
            for cls in ("honest", "malicious"):
                self.updates.labels(run, verdict, cls)

    def round_done(self, run: str, res, malicious: set[str]) -> None:
        self.round.labels(run).set(res.round)
        if res.accuracy == res.accuracy:  # not NaN
            self.accuracy.labels(run).set(res.accuracy / 100)
        self.duration.labels(run).set(res.seconds)
        self.agree.labels(run).set(1 if res.agree else 0)
        for verdict, workers in (("accepted", res.accepted), ("rejected", res.rejected)):
            for w in workers:
                self.updates.labels(run, verdict, "malicious" if w in malicious else "honest").inc()

    def done(self, run: str) -> None:
        self.finished.labels(run).set(1)

    def close(self) -> None:
        if self.server is not None:
            stop_serving(self.server)
            self.server = None


def write_targets(directory: Path, run: str, targets: list[str]) -> Path:
    """A Prometheus file_sd file for this run (monitoring/prometheus-local.yml reads the folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{run}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": targets, "labels": {}}], indent=1) + "\n")
    os.replace(tmp, path)  # Prometheus must never read half a file
    return path
