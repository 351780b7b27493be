"""The Kubernetes manifests in k8s/: schema, policy, cross-references, generated files, and the
Prometheus / Mosquitto configurations they carry, checked with the real promtool and mosquitto.

Fast (a few seconds): no cluster and no container image are needed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.30.0"  # schema of kubernetes-validate to check against (strict)
NAMESPACE = "bfl"
#: Created by the user (kubectl create secret ...), documented in k8s/40-agents.yaml.
USER_SECRETS = {"bfl-operator": ("operator.key", "operator.pub")}
OPERATOR_SECRET_CMD = (
    "kubectl create secret generic bfl-operator --from-file=operator.key --from-file=operator.pub -n bfl"
)
WORKLOADS = ("Deployment", "StatefulSet", "Job", "Pod", "DaemonSet", "ReplicaSet", "CronJob")

sys.path.insert(0, str(ROOT / "scripts"))
import k8s_sync  # noqa: E402


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _load(paths):
    out = []
    for p in paths:
        for doc in yaml.safe_load_all(p.read_text()):
            if doc is not None:
                out.append((p, doc))
    return out


#: What `kubectl apply -f k8s/` applies (not recursive), in order.
APPLIED = _load(sorted(K8S.glob("*.yaml")))
#: Plus the optional extras under k8s/tools/ (applied by hand).
ALL_DOCS = APPLIED + _load(sorted(K8S.glob("*/*.yaml")))


def _id(item):
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def objects(kind, docs=APPLIED):
    return {d["metadata"]["name"]: d for _, d in docs if d.get("kind") == kind}


def one(kind, name, docs=APPLIED):
    objs = objects(kind, docs)
    assert name in objs, f"no {kind} {name} in k8s/"
    return objs[name]


def pod_template(doc):
    """(pod metadata, pod spec) of a workload."""
    kind = doc["kind"]
    if kind == "Pod":
        return doc["metadata"], doc["spec"]
    if kind == "CronJob":
        t = doc["spec"]["jobTemplate"]["spec"]["template"]
    else:
        t = doc["spec"]["template"]
    return t.get("metadata", {}), t["spec"]


def workloads(docs=ALL_DOCS):
    return [(p, d) for p, d in docs if d.get("kind") in WORKLOADS]


def containers(spec):
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def mount_for(container, spec, path):
    """(volumeMount, volume or None) whose mountPath holds ``path`` (the deepest one)."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = PurePosixPath(m["mountPath"])
        if PurePosixPath(path) == mp or mp in PurePosixPath(path).parents:
            if best is None or len(str(mp)) > len(best["mountPath"]):
                best = m
    if best is None:
        return None, None
    vol = next((v for v in spec.get("volumes", []) if v["name"] == best["name"]), None)
    return best, vol


def statefulset_agents():
    return [d for d in objects("StatefulSet").values() if d["spec"]["template"]["spec"]["containers"][0]["command"][:1] == ["bfl-agent"]]


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------
def test_files_and_order():
    names = [p.name for p in sorted(K8S.glob("*.yaml"))]
    assert names and all(re.match(r"^\d\d-[a-z0-9-]+\.yaml$", n) for n in names), names
    # the namespace comes first, the orchestrator (which needs everything else) last
    assert APPLIED[0][1]["kind"] == "Namespace" and APPLIED[0][1]["metadata"]["name"] == NAMESPACE
    assert APPLIED[-1][1]["kind"] == "Job"
    # ConfigMaps a workload mounts are applied before it
    order = {(d["kind"], d["metadata"]["name"]): i for i, (_, d) in enumerate(APPLIED)}
    for _, d in workloads(APPLIED):
        for v in pod_template(d)[1].get("volumes", []):
            if "configMap" in v:
                assert order[("ConfigMap", v["configMap"]["name"])] < order[(d["kind"], d["metadata"]["name"])]


@pytest.mark.parametrize("item", ALL_DOCS, ids=_id)
def test_validates_against_kubernetes_schema(item):
    import kubernetes_validate

    path, doc = item
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{_id(item)}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_strict_validation_rejects_unknown_fields():
    """Guards the test above: strict mode really rejects a misspelt field."""
    import kubernetes_validate

    dep = copy.deepcopy(one("Deployment", "mosquitto"))
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    dep = copy.deepcopy(one("Deployment", "mosquitto"))
    dep["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


@pytest.mark.parametrize("item", ALL_DOCS, ids=_id)
def test_namespace_is_bfl(item):
    _, doc = item
    if doc["kind"] == "Namespace":
        assert doc["metadata"]["name"] == NAMESPACE
        labels = doc["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    else:
        assert doc["metadata"].get("namespace") == NAMESPACE
    for s in doc.get("subjects", []):
        assert s.get("namespace", NAMESPACE) == NAMESPACE


def test_names_are_unique():
    seen = set()
    for _, d in APPLIED:
        key = (d["kind"], d["metadata"]["name"])
        assert key not in seen, f"{key} defined twice"
        seen.add(key)


# --------------------------------------------------------------------------------------------
# policy: resources, probes, security, images
# --------------------------------------------------------------------------------------------
def _containers_of_all():
    out = []
    for p, d in workloads():
        meta, spec = pod_template(d)
        for c in containers(spec):
            out.append(pytest.param(d, spec, c, id=f"{d['kind']}/{d['metadata']['name']}/{c['name']}"))
    return out


CONTAINERS = _containers_of_all()


@pytest.mark.parametrize("doc,spec,c", CONTAINERS)
def test_container_resources(doc, spec, c):
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            assert r in res.get(part, {}), f"{c['name']}: no resources.{part}.{r}"


def _mib(q: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)?", str(q))
    assert m, q
    return float(m.group(1)) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, None: 1 / 2**20}[m.group(2)]


def test_memory_limits_fit_the_programs():
    agent = one("StatefulSet", "bfl-agent")["spec"]["template"]["spec"]["containers"][0]
    validator = one("StatefulSet", "bfl-validator")["spec"]["template"]["spec"]["containers"][0]
    # PyTorch alone is ~600-800 MB RSS; the validator has no torch
    assert _mib(agent["resources"]["limits"]["memory"]) >= 1024
    assert 256 <= _mib(validator["resources"]["limits"]["memory"]) < 1024
    for _, spec, c in (p.values for p in CONTAINERS):
        assert _mib(c["resources"]["requests"]["memory"]) <= _mib(c["resources"]["limits"]["memory"])


@pytest.mark.parametrize("doc,spec,c", CONTAINERS)
def test_container_probes(doc, spec, c):
    if doc["kind"] in ("Job", "CronJob") or c in spec.get("initContainers", []):
        return  # a Job's container ends on its own
    for probe in ("livenessProbe", "readinessProbe"):
        assert probe in c, f"{c['name']}: no {probe}"
        p = c[probe]
        # a named port must exist on the container
        for kind in ("httpGet", "tcpSocket"):
            if kind in p and isinstance(p[kind]["port"], str):
                assert p[kind]["port"] in {cp.get("name") for cp in c.get("ports", [])}


@pytest.mark.parametrize("doc,spec,c", CONTAINERS)
def test_container_security(doc, spec, c):
    pod = spec.get("securityContext", {})
    sc = c.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True
    uid = sc.get("runAsUser", pod.get("runAsUser"))
    assert isinstance(uid, int) and uid > 0
    assert (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type") == "RuntimeDefault"
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged", False) is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert not sc.get("capabilities", {}).get("add")
    assert sc.get("readOnlyRootFilesystem") is True
    # ... with a writable /tmp
    if doc["metadata"]["name"] != "bfl-results-reader":
        m, v = mount_for(c, spec, "/tmp")
        assert m is not None and m["mountPath"] == "/tmp" and "emptyDir" in v, f"{c['name']}: no emptyDir on /tmp"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for v in spec.get("volumes", []):
        assert "hostPath" not in v
    # only Prometheus talks to the API server
    if not spec.get("serviceAccountName"):
        assert spec.get("automountServiceAccountToken") is False


@pytest.mark.parametrize("doc,spec,c", CONTAINERS)
def test_image_is_pinned(doc, spec, c):
    image = c["image"]
    if "@sha256:" in image:
        return
    last = image.rsplit("/", 1)[-1]
    assert ":" in last, f"{image}: no tag"
    tag = last.split(":", 1)[1]
    assert tag and tag != "latest" and re.search(r"\d", tag), f"{image}: pin a version"


def test_project_images():
    assert one("StatefulSet", "bfl-agent")["spec"]["template"]["spec"]["containers"][0]["image"] == "posbfl-testbed:0.1.0"
    assert one("StatefulSet", "bfl-validator")["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "posbfl-testbed:0.1.0-validator"
    )
    assert one("Job", "bfl-orchestrator")["spec"]["template"]["spec"]["containers"][0]["image"] == "posbfl-testbed:0.1.0"


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------
def _refs(spec):
    """(kind, name, keys or None) referenced by a pod spec."""
    out = []
    if spec.get("serviceAccountName"):
        out.append(("ServiceAccount", spec["serviceAccountName"], None))
    for v in spec.get("volumes", []):
        if "configMap" in v:
            out.append(("ConfigMap", v["configMap"]["name"], [i["key"] for i in v["configMap"].get("items", [])]))
        if "secret" in v:
            out.append(("Secret", v["secret"]["secretName"], [i["key"] for i in v["secret"].get("items", [])]))
        if "persistentVolumeClaim" in v:
            out.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], None))
        for src in v.get("projected", {}).get("sources", []):
            if "configMap" in src:
                out.append(("ConfigMap", src["configMap"]["name"], [i["key"] for i in src["configMap"].get("items", [])]))
            if "secret" in src:
                out.append(("Secret", src["secret"]["name"], [i["key"] for i in src["secret"].get("items", [])]))
    for c in containers(spec):
        for e in c.get("env", []):
            vf = e.get("valueFrom", {})
            if "configMapKeyRef" in vf:
                out.append(("ConfigMap", vf["configMapKeyRef"]["name"], [vf["configMapKeyRef"]["key"]]))
            if "secretKeyRef" in vf:
                out.append(("Secret", vf["secretKeyRef"]["name"], [vf["secretKeyRef"]["key"]]))
        for ef in c.get("envFrom", []):
            if "configMapRef" in ef:
                out.append(("ConfigMap", ef["configMapRef"]["name"], []))
            if "secretRef" in ef:
                out.append(("Secret", ef["secretRef"]["name"], []))
    return out


@pytest.mark.parametrize("item", workloads(), ids=_id)
def test_referenced_objects_exist(item):
    path, doc = item
    meta, spec = pod_template(doc)
    for kind, name, keys in _refs(spec):
        if kind == "Secret" and name in USER_SECRETS:
            assert set(keys or USER_SECRETS[name]) <= set(USER_SECRETS[name])
            continue
        obj = one(kind, name)  # in what `kubectl apply -f k8s/` creates
        if keys:
            data = {**obj.get("data", {}), **obj.get("stringData", {})}
            assert set(keys) <= set(data), f"{kind} {name} has no key(s) {set(keys) - set(data)}"
    # every volumeMount names a volume (or a volumeClaimTemplate)
    names = {v["name"] for v in spec.get("volumes", [])}
    names |= {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])} if doc["kind"] == "StatefulSet" else set()
    for c in containers(spec):
        for m in c.get("volumeMounts", []):
            assert m["name"] in names, f"{c['name']}: volumeMount {m['name']} has no volume"


def test_user_created_secret_is_documented():
    """The one object not in k8s/: the operator key Secret, created with a documented command."""
    for f in ("00-namespace.yaml", "40-agents.yaml"):
        assert OPERATOR_SECRET_CMD in (K8S / f).read_text(), f"k8s/{f}: document `{OPERATOR_SECRET_CMD}`"
    assert "Secret" not in {d["kind"] for _, d in APPLIED}, "no Secret with key material in the repository"


def test_service_selectors_match_pods():
    pods = [pod_template(d) for _, d in workloads(APPLIED)]
    for name, svc in objects("Service").items():
        sel = svc["spec"]["selector"]
        matching = [(m, s) for m, s in pods if sel.items() <= m.get("labels", {}).items()]
        assert matching, f"Service {name}: selector {sel} matches no pod template"
        for port in svc["spec"]["ports"]:
            tp = port.get("targetPort", port["port"])
            for m, s in matching:
                cports = [cp for c in s["containers"] for cp in c.get("ports", [])]
                assert any(tp in (cp.get("name"), cp["containerPort"]) for cp in cports), f"Service {name}: no port {tp}"


def test_workload_selectors_match_their_templates():
    for _, d in workloads(APPLIED):
        if d["kind"] in ("Deployment", "StatefulSet"):
            sel = d["spec"]["selector"]["matchLabels"]
            assert sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    for name, sts in objects("StatefulSet").items():
        svc = one("Service", sts["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None", f"StatefulSet {name}: its serviceName must be a headless Service"


# --------------------------------------------------------------------------------------------
# the agents and the orchestrator, against the real command-line interfaces
# --------------------------------------------------------------------------------------------
def _click_command(module, name):
    import typer

    return typer.main.get_command(module.app).commands[name]


def _job_args():
    job = one("Job", "bfl-orchestrator")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["bfl", "run"]
    from orchestrator import cli

    cmd = _click_command(cli, "run")
    flags, opts = set(), set()
    for p in cmd.params:
        (flags if getattr(p, "is_flag", False) else opts).update([*p.opts, *p.secondary_opts])
    args, parsed = list(c["args"]), {}
    while args:
        a = args.pop(0)
        assert a in flags or a in opts, f"`bfl run` has no option {a}"
        parsed[a] = True if a in flags else args.pop(0)
    return job, c, parsed


def test_agent_environment_matches_the_agent_cli():
    from edge_agent import cli

    envvars = set()
    for p in _click_command(cli, "run").params:
        envvars |= {p.envvar} if isinstance(p.envvar, str) else set(p.envvar or ())
    required = {"BFL_DEVICE_ID", "BFL_KEY", "BFL_CREATE_KEY", "BFL_WORKDIR", "BFL_BROKER", "BFL_OPERATOR_KEY", "BFL_METRICS_PORT", "BFL_THREADS"}
    for sts in statefulset_agents():
        c = sts["spec"]["template"]["spec"]["containers"][0]
        env = env_of(c)
        assert required <= set(env), f"{sts['metadata']['name']}: missing {required - set(env)}"
        for name in env:
            assert name in envvars or not name.startswith("BFL_"), f"bfl-agent run reads no {name}"


@pytest.mark.parametrize("name", ["bfl-agent", "bfl-validator"])
def test_statefulset_identity_key_and_storage(name):
    from edge_agent.protocol.messages import valid_id

    sts = one("StatefulSet", name)
    spec = sts["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = env_of(c)
    # device id = pod name, from the downward API
    assert env["BFL_DEVICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert all(valid_id(f"{name}-{i}") for i in range(100))
    # the key lives on the pod's own PVC (volumeClaimTemplates), created on first start
    assert env["BFL_CREATE_KEY"]["value"] in ("1", "true")
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    for var in ("BFL_KEY", "BFL_WORKDIR"):
        m, vol = mount_for(c, spec, env[var]["value"])
        assert m is not None and vol is None and m["name"] in templates, f"{var} must be on a volumeClaimTemplate"
        assert not m.get("readOnly")
    assert "ReadWriteOnce" in templates[m["name"]]["spec"]["accessModes"]
    assert spec["securityContext"].get("fsGroup"), "fsGroup makes the PVC writable for the non-root user"
    # the operator's public key (only that) from the user's Secret
    m, vol = mount_for(c, spec, env["BFL_OPERATOR_KEY"]["value"])
    assert vol["secret"]["secretName"] == "bfl-operator"
    assert [i["key"] for i in vol["secret"]["items"]] == ["operator.pub"]
    assert PurePosixPath(env["BFL_OPERATOR_KEY"]["value"]).name == "operator.pub"
    # broker = the Mosquitto Service
    _assert_is_mosquitto(env["BFL_BROKER"]["value"])
    # metrics port = the port the probes and Prometheus use
    port = int(env["BFL_METRICS_PORT"]["value"])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/metrics" and c[probe]["httpGet"]["port"] in ("metrics", port)
    assert env["BFL_THREADS"]["value"] == "1"
    assert sts["metadata"]["labels"]["app.kubernetes.io/part-of"] == "posbfl-testbed"


def test_validators_do_not_train():
    env = env_of(one("StatefulSet", "bfl-validator")["spec"]["template"]["spec"]["containers"][0])
    assert env["BFL_CAPS"]["value"] == "validate,mine"
    assert "BFL_CAPS" not in env_of(one("StatefulSet", "bfl-agent")["spec"]["template"]["spec"]["containers"][0])


def _assert_is_mosquitto(url):
    u = urlparse(url)
    assert u.scheme == "mqtt"
    svc = one("Service", "mosquitto")
    assert u.hostname in ("mosquitto", f"mosquitto.{NAMESPACE}", f"mosquitto.{NAMESPACE}.svc", f"mosquitto.{NAMESPACE}.svc.cluster.local")
    assert u.port in [p["port"] for p in svc["spec"]["ports"]]


def agent_pods() -> tuple[list[str], list[str]]:
    """The device ids (pod names) the agent StatefulSets create, and those that can train."""
    pods, trainers = [], []
    for s in statefulset_agents():
        names = [f"{s['metadata']['name']}-{i}" for i in range(s["spec"]["replicas"])]
        pods += names
        caps = env_of(s["spec"]["template"]["spec"]["containers"][0]).get("BFL_CAPS", {}).get("value", "train")
        trainers += names if "train" in caps else []
    return sorted(pods), trainers


def expected_malicious() -> list[str]:
    """Whom the Job's `bfl run` makes malicious: drawn by --seed among the admitted pods that
    can train (orchestrator.experiment.choose_malicious), every agent pod being admitted
    (--devices = their number)."""
    from orchestrator.experiment import RunConfig, choose_malicious

    _, _, args = _job_args()
    cfg = RunConfig(malicious=int(args["--malicious"]), seed=int(args.get("--seed", 0)))
    return choose_malicious(cfg, *agent_pods())


def _job_comments() -> str:
    return "\n".join(line for line in (K8S / "50-orchestrator.yaml").read_text().splitlines() if line.lstrip().startswith("#"))


def test_orchestrator_job_matches_the_cli_and_the_agents():
    job, c, args = _job_args()
    spec = job["spec"]["template"]["spec"]
    assert args["--external"] is True
    _assert_is_mosquitto(args["--broker"])
    # --devices = every agent pod: the orchestrator admits the first N that announce themselves
    pods, trainers = agent_pods()
    assert int(args["--devices"]) == len(pods), pods
    w, v, m = (int(x) for x in args["--roles"].split(","))
    assert 1 <= w <= len(trainers) and w + v + m <= int(args["--devices"])
    assert 0 < int(args["--malicious"]) < int(args["--devices"])
    assert args["--model"] == "mlp" and args["--dataset"] == "fashion-mnist"
    # the malicious devices the orchestrator will pick (by --seed, among the admitted pods that
    # can train) are the ones the comment beside --seed names
    bad = expected_malicious()
    assert bad and all(f" {d}." in _job_comments() for d in bad), bad
    assert args.get("--quiet") is True
    # the operator's secret key from the user's Secret
    m_, vol = mount_for(c, spec, args["--operator-key"])
    assert vol["secret"]["secretName"] == "bfl-operator" and PurePosixPath(args["--operator-key"]).name == "operator.key"
    # results on the PVC, one directory per pod ($(POD_NAME) is expanded by Kubernetes)
    m_, vol = mount_for(c, spec, args["--out"])
    assert vol["persistentVolumeClaim"]["claimName"] == "bfl-results"
    for ref in re.findall(r"\$\((\w+)\)", args["--out"]):
        assert env_of(c)[ref]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # metrics: on all interfaces, on the port Prometheus scrapes; its targets file in /tmp
    assert {"name": "metrics", "containerPort": int(args["--metrics-port"]), "protocol": "TCP"} in c["ports"]
    assert args["--metrics-addr"] == "0.0.0.0"
    m_, vol = mount_for(c, spec, args["--metrics-targets"])
    assert "emptyDir" in vol
    assert spec["restartPolicy"] == "Never"


def test_acl_admits_every_pod():
    """Mosquitto's ACL has a user block for every device the StatefulSets can create."""
    acl = yaml.safe_load(Path(K8S / "10-mosquitto-config.yaml").read_text())["data"]["acl"]
    users = set(re.findall(r"^user (\S+)$", acl, re.M))
    assert "operator" in users  # the orchestrator's MQTT username
    for sts in statefulset_agents():
        name, n = sts["metadata"]["name"], sts["spec"]["replicas"]
        assert name in k8s_sync.ACL_DEVICES and n <= k8s_sync.ACL_DEVICES[name]
        assert {f"{name}-{i}" for i in range(n)} <= users
    assert set(k8s_sync.ACL_DEVICES) == {s["metadata"]["name"] for s in statefulset_agents()}


# --------------------------------------------------------------------------------------------
# generated files
# --------------------------------------------------------------------------------------------
def test_generated_files_are_in_sync():
    assert k8s_sync.stale() == [], "run: python scripts/k8s_sync.py"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "k8s_sync.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_sync_check_detects_a_stale_file(tmp_path):
    assert set(k8s_sync.stale(tmp_path)) == {tmp_path / k8s_sync.MOSQUITTO_FILE, tmp_path / k8s_sync.DASHBOARDS_FILE}
    for p, text in k8s_sync.generated(tmp_path).items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    assert k8s_sync.stale(tmp_path) == []
    (tmp_path / k8s_sync.DASHBOARDS_DIR).mkdir(parents=True)
    (tmp_path / k8s_sync.DASHBOARDS_DIR / "new.json").write_text("{}")
    assert k8s_sync.stale(tmp_path) == [tmp_path / k8s_sync.DASHBOARDS_FILE]


def test_dashboards_configmap_from_a_fixture(tmp_path):
    d = tmp_path / "dashboards"
    d.mkdir()
    placeholder = {"title": "placeholder", "uid": "placeholder", "panels": [{"type": "stat", "title": "x: \"y\"\n"}]}
    (d / "b-placeholder.json").write_text(json.dumps(placeholder, indent=2) + "\n")
    (d / "a-tiny.json").write_text('{"title": "tiny"}')
    (d / "notes.txt").write_text("not a dashboard")
    text = k8s_sync.render_dashboards_configmap(d)
    import kubernetes_validate

    doc = yaml.safe_load(text)
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert list(doc["data"]) == ["a-tiny.json", "b-placeholder.json"]
    assert json.loads(doc["data"]["b-placeholder.json"]) == placeholder
    assert doc["data"]["a-tiny.json"] == '{"title": "tiny"}'
    (d / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        k8s_sync.render_dashboards_configmap(d)


def test_dashboards_configmap_holds_every_dashboard():
    doc = one("ConfigMap", "grafana-dashboards")
    files = sorted(p.name for p in (ROOT / "grafana" / "dashboards").glob("*.json"))
    assert sorted(doc.get("data") or {}) == files
    for name, text in (doc.get("data") or {}).items():
        assert json.loads(text) == json.loads((ROOT / "grafana" / "dashboards" / name).read_text())


# --------------------------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------------------------
def test_grafana_provisioning():
    prov = one("ConfigMap", "grafana-provisioning")["data"]
    ds = yaml.safe_load(prov["datasources.yaml"])["datasources"]
    prom = [d for d in ds if d["type"] == "prometheus"]
    assert len(prom) == 1 and prom[0]["uid"] == "prometheus"
    u = urlparse(prom[0]["url"])
    assert u.hostname.split(".")[0] == "prometheus" and u.hostname in ("prometheus", "prometheus.bfl.svc.cluster.local")
    assert u.port in [p["port"] for p in one("Service", "prometheus")["spec"]["ports"]]
    providers = yaml.safe_load(prov["dashboards.yaml"])["providers"]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    dep = one("Deployment", "grafana")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    m, vol = mount_for(c, spec, providers[0]["options"]["path"] + "/x.json")
    assert vol["configMap"]["name"] == "grafana-dashboards"
    for sub, key in (("datasources", "datasources.yaml"), ("dashboards", "dashboards.yaml")):
        m, vol = mount_for(c, spec, f"/etc/grafana/provisioning/{sub}/{key}")
        assert vol["configMap"]["name"] == "grafana-provisioning"
        assert [i["path"] for i in vol["configMap"]["items"]] == [key]


# --------------------------------------------------------------------------------------------
# Prometheus: the real promtool
# --------------------------------------------------------------------------------------------
def _promtool():
    exe = shutil.which("promtool") or ("/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None)
    if exe is None:  # a missing tool is a failure, not a skip
        pytest.fail("promtool not found: apt-get install prometheus (scripts/setup.sh)")
    return exe


#: kubernetes_sd_config fields of Prometheus 2.53 (docs: configuration/#kubernetes_sd_config).
_K8S_SD_KEYS = {
    "api_server", "role", "kubeconfig_file", "namespaces", "selectors", "attach_metadata",
    # HTTP client settings
    "basic_auth", "authorization", "oauth2", "bearer_token", "bearer_token_file", "tls_config",
    "proxy_url", "no_proxy", "proxy_from_environment", "proxy_connect_header", "follow_redirects",
    "enable_http2",
}  # fmt: skip
_K8S_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}


def _check_kubernetes_sd(sd):
    assert set(sd) <= _K8S_SD_KEYS, f"unknown kubernetes_sd_configs fields {set(sd) - _K8S_SD_KEYS}"
    assert sd["role"] in _K8S_SD_ROLES
    assert set(sd.get("namespaces", {})) <= {"own_namespace", "names"}
    assert all(isinstance(n, str) for n in sd.get("namespaces", {}).get("names", []))
    for sel in sd.get("selectors", []):
        assert set(sel) <= {"role", "label", "field"} and sel["role"] in _K8S_SD_ROLES


def _promtool_check(path):
    r = subprocess.run([_promtool(), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def test_prometheus_config_passes_promtool(tmp_path):
    """`promtool check config` on the ConfigMap's prometheus.yml.

    Debian's promtool (the prometheus package) is built without Kubernetes service discovery
    and rejects `kubernetes_sd_configs` as an unknown field. With such a promtool, the
    kubernetes_sd_configs blocks are checked against Prometheus's documented fields here and
    replaced by an empty file_sd_configs, and promtool checks all the rest (globals, scrape
    jobs, every relabelling rule); an upstream promtool checks the file as it is.
    """
    text = one("ConfigMap", "prometheus-config")["data"]["prometheus.yml"]
    conf_path = tmp_path / "prometheus.yml"
    conf_path.write_text(text)
    rc, out = _promtool_check(conf_path)
    if rc != 0:
        errors = [ln for ln in out.splitlines() if re.match(r"\s*line \d+:", ln)]
        assert errors and all("field kubernetes_sd_configs not found" in ln for ln in errors), out
        conf = yaml.safe_load(text)
        n = 0
        for job in conf["scrape_configs"]:
            for sd in job.pop("kubernetes_sd_configs", []):
                _check_kubernetes_sd(sd)
                n += 1
                job.setdefault("file_sd_configs", []).append({"files": [str(tmp_path / "targets.json")]})
        assert n >= 1
        (tmp_path / "targets.json").write_text("[]\n")
        conf_path.write_text(yaml.safe_dump(conf, sort_keys=False))
        rc, out = _promtool_check(conf_path)
    assert rc == 0, out
    # and promtool does reject a broken one (the check is real)
    conf_path.write_text(conf_path.read_text().replace("action: keep", "action: keeep", 1))
    rc, out = _promtool_check(conf_path)
    assert rc != 0 and "keeep" in out, out


def test_prometheus_relabelling_uses_pod_metadata():
    conf = yaml.safe_load(one("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    for job in conf["scrape_configs"]:
        roles = {sd["role"] for sd in job.get("kubernetes_sd_configs", [])}
        if roles:
            assert roles == {"pod"}
            for r in job.get("relabel_configs", []):
                for src in r.get("source_labels", []):
                    assert src.startswith("__meta_kubernetes_pod_") or src in ("__meta_kubernetes_namespace", "__address__"), src


def test_prometheus_scrapes_the_metrics_pods():
    dep = one("Deployment", "prometheus")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    args = dict(a.split("=", 1) for a in c["args"])
    m, vol = mount_for(c, spec, args["--config.file"])
    assert vol["configMap"]["name"] == "prometheus-config"
    assert PurePosixPath(args["--config.file"]).name in one("ConfigMap", "prometheus-config")["data"]
    # RBAC: the ServiceAccount may list and watch pods in the namespace
    assert spec["serviceAccountName"] == "prometheus" and spec.get("automountServiceAccountToken") is True
    rb = [b for b in objects("RoleBinding").values() if {"kind": "ServiceAccount", "name": "prometheus", "namespace": NAMESPACE} in b["subjects"]]
    assert rb and rb[0]["roleRef"]["kind"] == "Role"
    rules = one("Role", rb[0]["roleRef"]["name"])["rules"]
    assert any("pods" in r["resources"] and {"list", "watch"} <= set(r["verbs"]) for r in rules)
    # the scrape job keeps exactly our pods' metrics ports: emulate its keep rules
    conf = yaml.safe_load(one("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    job = next(j for j in conf["scrape_configs"] if j.get("kubernetes_sd_configs"))
    sd = job["kubernetes_sd_configs"][0]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [NAMESPACE]
    keeps = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    # the pod name becomes the `pod` (and `instance`) label
    for r in job["relabel_configs"]:
        if r.get("target_label") in ("pod", "instance"):
            assert r["source_labels"] == ["__meta_kubernetes_pod_name"]
    assert "pod" in {r.get("target_label") for r in job["relabel_configs"]}

    def meta(pod_meta, port_name):
        labels = pod_meta.get("labels", {})
        return {
            "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in labels.items()
        } | {"__meta_kubernetes_pod_container_port_name": port_name}

    def kept(m):
        return all(re.fullmatch(r["regex"], ";".join(m.get(s, "") for s in r["source_labels"])) for r in keeps)

    scraped = set()
    for _, d in workloads(APPLIED):
        pm, ps = pod_template(d)
        for c in ps["containers"]:
            for p in c.get("ports", []):
                if kept(meta(pm, p.get("name", ""))):
                    scraped.add((d["metadata"]["name"], p["containerPort"]))
    assert scraped == {("bfl-agent", 9400), ("bfl-validator", 9400), ("bfl-orchestrator", 9400)}


# --------------------------------------------------------------------------------------------
# Mosquitto: the real broker with the ConfigMap's config and ACL
# --------------------------------------------------------------------------------------------
class _Client:
    def __init__(self, port, username, client_id):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username:
            self.c.username_pw_set(username)
        self.c.on_message = lambda c, u, msg: self.messages.append((msg.topic, msg.payload))
        self.rc = None
        self.c.on_connect = lambda c, u, flags, rc, props=None: setattr(self, "rc", rc)
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        end = time.monotonic() + 10
        while self.rc is None and time.monotonic() < end:
            time.sleep(0.02)
        assert self.rc is not None and not self.rc.is_failure, f"{username}: connect failed ({self.rc})"

    def sub(self, topic):
        info = {}
        self.c.on_subscribe = lambda c, u, mid, rcs, props=None: info.setdefault("rcs", rcs)
        self.c.subscribe(topic, qos=1)
        end = time.monotonic() + 10
        while "rcs" not in info and time.monotonic() < end:
            time.sleep(0.02)
        assert "rcs" in info

    def pub(self, topic, payload=b"x", retain=False):
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self):
        self.c.disconnect()  # before loop_stop: the loop thread then ends at once
        self.c.loop_stop()


def test_mosquitto_accepts_the_configmap(tmp_path):
    """Start the real mosquitto with the ConfigMap's mosquitto.conf + acl (paths moved into a
    temp dir, port moved to a free one) and check who may publish and read what."""
    from broker import free_port, wait_for_port
    from broker.mosquitto import find_mosquitto

    try:
        exe = find_mosquitto()
    except Exception as exc:  # a missing broker is a failure, not a skip
        pytest.fail(str(exc))
    data = one("ConfigMap", "mosquitto-config")["data"]
    dep = one("Deployment", "mosquitto")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    conf = data["mosquitto.conf"]
    # the paths in the config are where the Deployment mounts the ConfigMap and a writable volume
    acl_path = re.search(r"^acl_file (\S+)$", conf, re.M).group(1)
    m, vol = mount_for(c, spec, acl_path)
    assert vol["configMap"]["name"] == "mosquitto-config" and PurePosixPath(acl_path).name in data
    assert c["command"][-1] == f"{m['mountPath']}/mosquitto.conf"
    persist = re.search(r"^persistence_location (\S+)$", conf, re.M).group(1)
    m, vol = mount_for(c, spec, persist + "mosquitto.db")
    assert "emptyDir" in vol and not m.get("readOnly")
    assert not re.search(r"^password_file", conf, re.M)  # see the comment in the ConfigMap
    listener = re.search(r"^listener (\d+) (\S+)$", conf, re.M)
    assert int(listener.group(1)) == c["ports"][0]["containerPort"] == 1883 and listener.group(2) == "0.0.0.0"

    port = free_port("127.0.0.1")
    (tmp_path / "config").mkdir()
    (tmp_path / "data").mkdir()
    cfg_dir = str(PurePosixPath(acl_path).parent)
    local = conf.replace(f"{cfg_dir}/", f"{tmp_path}/config/").replace(persist, f"{tmp_path}/data/")
    local = local.replace(listener.group(0), f"listener {port} 127.0.0.1")
    assert local.count(str(tmp_path)) == 2
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        import pwd

        local += f"\nuser {pwd.getpwuid(0).pw_name}\n"  # mosquitto would switch to user mosquitto
    (tmp_path / "config" / "mosquitto.conf").write_text(local)
    (tmp_path / "config" / "acl").write_text(data["acl"])
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen([exe, "-c", str(tmp_path / "config" / "mosquitto.conf")], stdout=log, stderr=log)
    clients = []
    try:
        end = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"mosquitto exited: {(tmp_path / 'mosquitto.log').read_text()}"
            try:
                wait_for_port("127.0.0.1", port, 0.2)
                break
            except Exception:
                assert time.monotonic() < end, "mosquitto did not listen"
        op = _Client(port, "operator", "bfl-operator-test")
        a3 = _Client(port, "bfl-agent-3", "bfl-agent-3")
        v1 = _Client(port, "bfl-validator-1", "bfl-validator-1")
        anon = _Client(port, None, "anonymous")
        clients += [op, a3, v1, anon]
        op.sub("bfl/v1/#")
        v1.sub("bfl/v1/#")
        anon.sub("bfl/v1/#")
        a3.sub("bfl/v1/#")
        a3.pub("bfl/v1/devices/bfl-agent-3/hello", b"hello")
        a3.pub("bfl/v1/r1/wtx/bfl-agent-3/0", b"update")
        a3.pub("bfl/v1/r1/wtx/bfl-agent-4/0", b"forged")  # another device's topic: dropped
        a3.pub("bfl/v1/r1/genesis", b"forged genesis")  # operator only: dropped
        anon.pub("bfl/v1/r1/wtx/anonymous/0", b"anon")  # no username, no access
        op.pub("bfl/v1/r1/genesis", b"genesis")
        op.pub("bfl/v1/r1/cmd/bfl-agent-3", b"attack")  # only bfl-agent-3 reads it
        v1.pub("bfl/v1/r1/vtx/bfl-validator-1/0", b"vote")
        time.sleep(0.5)

        def topics(cl):
            return sorted(t for t, _ in cl.messages)

        assert topics(op) == sorted([
            "bfl/v1/devices/bfl-agent-3/hello", "bfl/v1/r1/wtx/bfl-agent-3/0", "bfl/v1/r1/genesis",
            "bfl/v1/r1/cmd/bfl-agent-3", "bfl/v1/r1/vtx/bfl-validator-1/0",
        ])  # fmt: skip
        assert topics(v1) == sorted([
            "bfl/v1/devices/bfl-agent-3/hello", "bfl/v1/r1/wtx/bfl-agent-3/0", "bfl/v1/r1/genesis",
            "bfl/v1/r1/vtx/bfl-validator-1/0",
        ])  # fmt: skip
        assert "bfl/v1/r1/cmd/bfl-agent-3" in topics(a3)
        assert topics(anon) == []
        assert b"forged" not in {p for cl in (op, v1) for _, p in cl.messages}
    finally:
        for cl in clients:
            cl.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
