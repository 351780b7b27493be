"""k8s/ rehearsed with `podman kube play` (scripts/k8s_play.py): what the script turns the
manifests into (fast, no podman), and (slow) a whole experiment run from them -- Mosquitto
from its Deployment and ConfigMap, the agents from both StatefulSets, the orchestrator from
its Job -- with the images scripts/container/build.sh builds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import k8s_play  # scripts/ is on the path (conftest)
from conftest import ROOT
from test_k8s import expected_malicious, one

WORKLOADS = {"mosquitto", "bfl-agent", "bfl-validator", "bfl-orchestrator"}
JOB_POD = "bfl-orchestrator-play"


@pytest.fixture
def operator_secret(tmp_path):
    from edge_agent.protocol.crypto import KeyPair

    d = tmp_path / "bfl-operator"
    d.mkdir()
    key = KeyPair.generate()
    key.save(d / "operator.key")
    (d / "operator.pub").write_text(key.public_hex + "\n")
    return d


def planned(tmp_path, secret_dir):
    pods = k8s_play.plan(k8s_play.load_manifests(), {"bfl-operator": secret_dir}, tmp_path / "state")
    return {p["metadata"]["name"]: p for _, p in pods}


def volume(pod, name):
    return next(v for v in pod["spec"]["volumes"] if v["name"] == name)


# ------------------------------------------------------------------------- fast: the plan
def test_plan_names_pods_as_kubernetes_would(tmp_path, operator_secret):
    pods = planned(tmp_path, operator_secret)
    replicas = {n: one("StatefulSet", n)["spec"]["replicas"] for n in ("bfl-agent", "bfl-validator")}
    expected = {"mosquitto-pod-0", "prometheus-pod-0", "grafana-pod-0", JOB_POD}
    expected |= {f"{n}-{i}" for n, r in replicas.items() for i in range(r)}
    assert set(pods) == expected
    # deployments come first: their pod IPs become the Services' names for the rest
    order = list(pods)
    assert order.index("mosquitto-pod-0") < order.index("bfl-agent-0") < order.index(JOB_POD)
    # each StatefulSet pod has its own claim (its key and chain), as volumeClaimTemplates give
    claims = [volume(pods[f"bfl-agent-{i}"], "data")["persistentVolumeClaim"]["claimName"] for i in range(replicas["bfl-agent"])]
    assert claims == [f"data-bfl-agent-{i}" for i in range(replicas["bfl-agent"])]
    assert volume(pods[JOB_POD], "results")["persistentVolumeClaim"]["claimName"] == "bfl-results"


def test_plan_projects_configmaps_and_secrets_into_files(tmp_path, operator_secret):
    pods = planned(tmp_path, operator_secret)
    for pod in pods.values():
        for v in pod["spec"].get("volumes", []):
            assert not {"configMap", "secret", "emptyDir"} & set(v), (pod["metadata"]["name"], v)
    # the agents get only operator.pub (the volume's items), the orchestrator both files
    agent_dir = Path(volume(pods["bfl-agent-0"], "operator")["hostPath"]["path"])
    assert sorted(p.name for p in agent_dir.iterdir()) == ["operator.pub"]
    assert (agent_dir / "operator.pub").read_text() == (operator_secret / "operator.pub").read_text()
    job_dir = Path(volume(pods[JOB_POD], "operator")["hostPath"]["path"])
    assert sorted(p.name for p in job_dir.iterdir()) == ["operator.key", "operator.pub"]
    # Mosquitto's config and ACL are the ConfigMap's
    cm = one("ConfigMap", "mosquitto-config")
    conf_dir = Path(volume(pods["mosquitto-pod-0"], "config")["hostPath"]["path"])
    assert {p.name: p.read_text() for p in conf_dir.iterdir()} == cm["data"]
    # an emptyDir is the pod's own
    assert volume(pods["bfl-agent-0"], "tmp")["persistentVolumeClaim"]["claimName"] == "bfl-agent-0-tmp"


def test_plan_expands_variables_and_unpublishes_ports(tmp_path, operator_secret):
    pods = planned(tmp_path, operator_secret)
    args = pods[JOB_POD]["spec"]["containers"][0]["args"]
    assert args[args.index("--out") + 1] == f"/results/{JOB_POD}"
    assert not any("$(" in a for p in pods.values() for c in p["spec"]["containers"] for a in c.get("args", []))
    agent = pods["bfl-agent-0"]["spec"]["containers"][0]
    assert "ports" not in agent
    assert agent["livenessProbe"]["httpGet"]["port"] == 9400  # was the port's name, "metrics"
    # everything else is the manifest's own
    tpl = one("StatefulSet", "bfl-agent")["spec"]["template"]["spec"]
    assert agent["securityContext"] == tpl["containers"][0]["securityContext"]
    assert agent["env"] == tpl["containers"][0]["env"] and agent["image"] == tpl["containers"][0]["image"]
    assert pods["bfl-agent-0"]["spec"]["securityContext"] == tpl["securityContext"]


def test_missing_secret_and_bad_arguments_are_one_line_errors(tmp_path, operator_secret):
    with pytest.raises(k8s_play.PlayError, match="pass --secret bfl-operator=DIR"):
        k8s_play.plan(k8s_play.load_manifests(), {}, tmp_path / "state")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(k8s_play.PlayError, match="has no key 'operator.pub'"):
        k8s_play.plan(k8s_play.load_manifests(), {"bfl-operator": empty}, tmp_path / "state")
    for args, start in (
        (["up", "--secret", "bfl-operator"], "error: --secret"),
        (["up", "--secret", f"bfl-operator={tmp_path / 'nope'}"], "error: --secret"),
        (["up", "--secret", f"bfl-operator={operator_secret}", "--only", "bfl-agnet"], "error: --only names no"),
    ):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "k8s_play.py"), *args], capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith(start) and proc.stderr.count("\n") == 1, proc.stderr


# ----------------------------------------------------------------- slow: a real rehearsal
def metric(text: str, name: str, **labels) -> float | None:
    """The value of sample ``name`` with ``labels`` in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_manifests_run_an_experiment_under_podman_kube_play(tmp_path, project_images, operator_secret):
    podman = k8s_play.Podman()
    mosquitto_image = one("Deployment", "mosquitto")["spec"]["template"]["spec"]["containers"][0]["image"]
    tagged = not podman.exists("image", mosquitto_image)
    if tagged:  # no registry here: our Mosquitto 2 image stands in for eclipse-mosquitto
        podman("tag", project_images["broker"], mosquitto_image)
    docs = k8s_play.load_manifests()
    k8s_play.down(podman)  # a run interrupted before
    t0 = time.monotonic()
    try:
        ips, skipped = k8s_play.up(docs, {"bfl-operator": operator_secret}, tmp_path / "state", WORKLOADS, podman)
        assert not skipped
        agents = [n for n in ips if n.startswith(("bfl-agent-", "bfl-validator-"))]
        job = one("Job", "bfl-orchestrator")["spec"]["template"]["spec"]["containers"][0]
        container = f"{JOB_POD}-{job['name']}"
        end = time.monotonic() + 900
        while (state := json.loads(podman("inspect", container).stdout)[0]["State"])["Status"] not in ("exited", "stopped"):
            assert time.monotonic() < end, "the orchestrator did not finish in 900 s"
            time.sleep(2)
        run_s = time.monotonic() - t0
        logs = podman("logs", container)
        log = logs.stdout + logs.stderr
        if state["ExitCode"] != 0:
            tails = {a: podman("logs", "--tail", "15", f"{a}-agent", check=False) for a in agents}
            agent_logs = "\n".join(f"--- {a}\n{p.stdout}{p.stderr}" for a, p in tails.items())
            pytest.fail(f"the Job's bfl run exited {state['ExitCode']}:\n{log[-3000:]}\n{agent_logs}")
        print(f"\nexperiment from k8s/ under podman kube play: {run_s:.0f}s\n{log}")

        # the results on the Job's claim, in the directory $(POD_NAME) names
        def result(name: str) -> dict:
            cat = ("cat", f"/results/{JOB_POD}/{name}")
            return json.loads(podman("run", "--rm", "-v", "bfl-results:/results:ro", project_images["validator"], *cat).stdout)

        summary = result("summary.json")
        args = job["args"]
        assert summary["devices"] == int(args[args.index("--devices") + 1]) == len(agents)
        assert len(summary["rounds"]) == int(args[args.index("--rounds") + 1])
        assert sorted(summary["heads"]) == sorted(agents)  # device id = pod name
        assert len(set(summary["heads"].values())) == 1 and summary["heads"]["bfl-agent-0"] == summary["rounds"][-1]["block_hash"]
        assert summary["malicious"] == expected_malicious()
        for r in summary["rounds"]:
            assert not {w for w in r["workers"] if w.startswith("bfl-validator-")}, r  # no torch: never trains
            assert not set(summary["malicious"]) & set(r["accepted"]), r
        # one key per pod, on its own volume: every device signs with a key of its own
        devices = result("genesis.json")["body"]["devices"]
        assert sorted(devices) == sorted(agents) and len({d["pubkey"] for d in devices.values()}) == len(agents)
        assert {d for d, v in devices.items() if "train" not in v["caps"]} == {a for a in agents if a.startswith("bfl-validator-")}

        # every agent serves its metrics on its pod IP, as Prometheus scrapes them in a cluster
        height = len(summary["rounds"])
        for a in agents:
            with urllib.request.urlopen(f"http://{ips[a]}:9400/metrics", timeout=10) as r:
                text = r.read().decode()
            assert metric(text, "bfl_chain_height", device=a) == height, a
            assert metric(text, "bfl_stake", device=a) == summary["stakes"][a], a

        # the manifests' security context holds: unprivileged user, read-only root file system
        for a in ("bfl-agent-0", "bfl-validator-0"):
            p = podman("exec", f"{a}-agent", "sh", "-c", "id -u; touch /probe", check=False)
            assert p.stdout.split()[0] == "10001" and "Read-only file system" in p.stderr, p.stdout + p.stderr
    finally:
        k8s_play.down(podman)
        if tagged:
            podman("untag", mosquitto_image, check=False)
