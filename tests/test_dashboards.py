"""Grafana dashboards against the metrics the program really exports.

* static: every metric a panel's PromQL names is one the agents or the orchestrator export
  (taken from their live registries, not from a list kept by hand);
* live: a real Prometheus (Debian package) scrapes a local `bfl run` through the shipped
  monitoring/prometheus-local.yml, and every panel expression returns data.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from edge_agent.metrics import AGENT_METRICS, AgentMetrics, free_ports
from orchestrator.metrics import EXPERIMENT_METRICS, ExperimentMetrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
PROMQL_WORDS = {"sum", "rate", "increase", "histogram_quantile", "on", "by", "group_left", "without", "ignoring"}


def panels(dash: dict):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def exprs() -> list[tuple[str, str, str]]:
    out = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for p in panels(dash):
            for t in p.get("targets", []):
                out.append((path.name, p["title"], t["expr"]))
    return out


def concrete(expr: str) -> str:
    """The query Grafana sends with every variable at 'All' and a 30 s rate window."""
    return expr.replace("$__rate_interval", "30s").replace("$run", ".*").replace("$device", ".*")


def exported_samples() -> tuple[set[str], set[str]]:
    """(family names, sample names) the agent and orchestrator registries really expose."""
    a = AgentMetrics("d00", ["train", "validate", "mine"])
    a.joined("r1")
    a.global_accuracy(5000)
    e = ExperimentMetrics()
    families, samples = set(), set()
    for reg in (a.registry, e.registry):
        for fam in reg.collect():
            families.add(fam.name)
            if fam.type == "histogram":
                samples |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
            elif fam.type == "counter":
                samples.add(fam.name + "_total")
            else:
                samples.add(fam.name)
    return families, samples


def metric_names(expr: str) -> set[str]:
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_labels = re.sub(r"\{[^}]*\}", "", no_strings)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_labels) if w.startswith("bfl_")}


def test_dashboards_exist_and_are_well_formed():
    assert {p.name for p in DASHBOARDS} >= {"bfl-overview.json", "bfl-network.json"}
    uids = set()
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["uid"] not in uids
        uids.add(dash["uid"])
        ids = [p["id"] for p in panels(dash)]
        assert len(ids) == len(set(ids)), path.name
        names = {v["name"] for v in dash["templating"]["list"]}
        assert {"datasource", "run", "device"} <= names
        for p in panels(dash):
            if p["type"] == "row":
                continue
            assert p["targets"], f"{path.name}: panel {p['title']!r} has no query"
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}"


def test_metric_lists_match_what_the_registries_export():
    families, _ = exported_samples()
    listed = {n[: -len("_total")] if n.endswith("_total") else n for n in AGENT_METRICS + EXPERIMENT_METRICS}
    assert listed == families


def test_no_panel_names_a_metric_that_is_not_exported():
    _, samples = exported_samples()
    unknown = [(d, title, sorted(metric_names(e) - samples)) for d, title, e in exprs() if metric_names(e) - samples]
    assert not unknown, unknown
    used = set().union(*(metric_names(e) for _, _, e in exprs()))
    # the panels cover what issue 4 asks to see
    for needed in (
        "bfl_global_accuracy_ratio", "bfl_stake", "bfl_attack_info", "bfl_votes_total",
        "bfl_messages_dropped_total", "bfl_phase_duration_seconds_bucket", "bfl_mqtt_messages_sent_total",
    ):  # fmt: skip
        assert needed in used, needed


def test_dashboard_name_check_catches_a_typo():
    _, samples = exported_samples()
    assert metric_names('sum by (device) (rate(bfl_stakes{run=~"$run"}[5m]))') - samples == {"bfl_stakes"}
    assert metric_names('bfl_stake * on(run, device) group_left(attack) bfl_attack_info{attack="x"}') <= samples


def test_local_prometheus_config_matches_the_cli_default():
    from typer.main import get_command

    from orchestrator.cli import app

    cfg = yaml.safe_load((ROOT / "monitoring" / "prometheus-local.yml").read_text())
    files = cfg["scrape_configs"][0]["file_sd_configs"][0]["files"]
    run_cmd = get_command(app).commands["run"]
    default = next(p.default for p in run_cmd.params if p.name == "metrics_targets")
    # paths in the config are relative to its folder; `bfl run` writes relative to the cwd (the repo root)
    assert (ROOT / "monitoring" / files[0]).resolve().parent == (ROOT / default).resolve()
    out = subprocess.run(["promtool", "check", "config", str(ROOT / "monitoring" / "prometheus-local.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- live: a real Prometheus scrapes a real local experiment ---------------------------


def prom_query(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def last_values(base: str, query: str, start: float, end: float) -> dict[frozenset, float]:
    """Each series' last value in [start, end] (the agents are gone by now: instant queries
    after the run would hit Prometheus' staleness markers)."""
    data = prom_query(base, "/api/v1/query_range", query=query, start=start, end=end, step=1)
    return {frozenset(s["metric"].items()): float(s["values"][-1][1]) for s in data["result"] if s["values"]}


def has_value(data: dict) -> bool:
    for series in data["result"]:
        values = series.get("values") or [series.get("value")]
        if any(v and not math.isnan(float(v[1])) for v in values):
            return True
    return False


@pytest.fixture
def prometheus(tmp_path):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not installed (scripts/setup.sh installs the Debian package)")
    targets = tmp_path / "targets"
    targets.mkdir()
    cfg = yaml.safe_load((ROOT / "monitoring" / "prometheus-local.yml").read_text())
    cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(targets / "*.json")]
    cfg["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] = "1s"
    conf = tmp_path / "prometheus.yml"
    conf.write_text(yaml.safe_dump(cfg))
    port = free_ports(19090, 1)[0]
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                pytest.fail("prometheus did not start: " + (tmp_path / "prometheus.log").read_text()[-2000:])
            time.sleep(0.5)
        yield base, targets
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_panel_returns_data_from_a_live_run(prometheus, mosquitto_broker, tmp_path):
    base, targets = prometheus
    port = free_ports(19400, 1)[0]
    t0 = time.time()
    out = subprocess.run(
        [
            sys.executable, "-m", "orchestrator.cli", "run",
            "--devices", "6", "--roles", "3,2,1", "--malicious-ids", "d02", "--rounds", "4",
            # rounds of about 2 s: a rate over the phase histograms needs a 2 s scrape between
            # two rounds (rounds of 0.3 s left those panels empty one time in three)
            "--model", "mlp", "--dataset", "fashion-mnist", "--samples-per-device", "2000", "--local-epochs", "3",
            "--deadlines", "120,60,60", "--quiet", "--broker", mosquitto_broker, "--out", str(tmp_path / "run"),
            "--metrics-port", str(port), "--metrics-targets", str(targets),
        ],
        capture_output=True, text=True, timeout=400, env={**os.environ},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"http://127.0.0.1:{port}/metrics" in out.stdout  # the run says where its metrics are
    assert not list(targets.glob("*.json"))  # the targets file is gone with the run
    t1 = time.time() + 5
    time.sleep(3)
    # Prometheus scraped the operator and all six agents
    up = prom_query(base, "/api/v1/query_range", query="up", start=t0, end=t1, step=1)
    assert len(up["result"]) == 7, up
    missing = []
    for dash, title, expr in exprs():
        q = concrete(expr)
        data = prom_query(base, "/api/v1/query_range", query=q, start=t0, end=t1, step=2)
        if not has_value(data):
            missing.append(f"{dash} / {title}: {q}")
    assert not missing, "queries without data:\n" + "\n".join(missing)
    # and the values are the run's: the malicious device is labelled, accuracy is a ratio
    mal = last_values(base, 'bfl_attack_info{attack!="none"}', t0, t1)
    assert {dict(k)["device"] for k in mal} == {"d02"}
    acc = last_values(base, "bfl_global_accuracy_ratio", t0, t1)
    assert len(acc) == 6 and all(0.1 < v <= 1.0 for v in acc.values())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    height = last_values(base, "bfl_chain_height", t0, t1)
    assert sorted(height.values()) == [len(summary["rounds"])] * 6 == [4] * 6
    # the final stakes Prometheus holds are the chain's (the lingering agents were scraped)
    stakes = last_values(base, "bfl_stake", t0, t1)
    assert {dict(k)["device"]: int(v) for k, v in stakes.items()} == summary["stakes"]
    verdicts = last_values(base, "bfl_experiment_updates_total", t0, t1)
    rejected_mal = sum(v for k, v in verdicts.items() if ("verdict", "rejected") in k and ("worker_class", "malicious") in k)
    assert rejected_mal == sum(1 for r in summary["rounds"] for d in r["rejected"] if d == "d02")
