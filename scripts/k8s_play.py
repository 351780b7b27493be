#!/usr/bin/env python3
"""Rehearse k8s/ on one machine with ``podman kube play`` (podman >= 4.3): no cluster needed.

podman kube play runs Pods and Deployments on a podman bridge network. The manifests in k8s/
also use StatefulSets, a Job, a user-created Secret and Services, which podman 4.3 does not
know. This script plays the manifests' own pod specs -- images, commands, arguments,
environment, security contexts, resources, volume mounts -- and changes only what podman
lacks, each change standing in for what Kubernetes does:

* a StatefulSet of N replicas -> N Pods ``<name>-0`` .. ``<name>-(N-1)``, each with its own
  claim ``<volumeClaimTemplate>-<pod>`` (a podman named volume): the identity a StatefulSet
  gives (the pod name is the device id, the volume keeps its key);
* a Job -> one Pod ``<job>-play`` with the Job's template (restartPolicy Never);
* ``configMap`` and ``secret`` volumes -> ``hostPath`` folders with the files they project
  (a Secret's files come from ``--secret NAME=DIR``: what ``kubectl create secret generic
  NAME --from-file=...`` was given), readable by the pod's user;
* ``emptyDir`` volumes and claims -> named volumes of this pod, owned by the pod's user and
  ``fsGroup`` (podman ignores fsGroup, and 4.3 shares an emptyDir between all pods that use
  the same volume name);
* ``$(VAR)`` in command and args -> the variable's value (Kubernetes expands it);
* containerPorts are dropped and probes name their port by number (podman 4.3 publishes every
  containerPort on the host, where the agents' :9400 would collide); pods are reached at
  their IPs, as in a cluster;
* a Service in front of a Deployment -> ``hostAliases`` in every later pod, from the
  Service's DNS names (``mosquitto``, ``mosquitto.bfl``, ``mosquitto.bfl.svc``,
  ``mosquitto.bfl.svc.cluster.local``) to that Deployment's pod IP (the bridge network has
  no cluster DNS).

Deployments are played first, then StatefulSets, then Jobs, each only where its images are in
podman's local store (scripts/container/build.sh builds the project's; ``eclipse-mosquitto``
may be any Mosquitto 2 image tagged so, e.g. the ``-broker`` target). Namespace,
NetworkPolicy, RBAC and the Services themselves have no podman counterpart and are left out.
Probes become podman healthchecks, which need systemd to run.

    scripts/k8s_play.py up --secret bfl-operator=DIR [--only mosquitto,bfl-agent,...]
    scripts/k8s_play.py down        # remove the pods and volumes that `up` made

tests/test_k8s_play.py runs a whole experiment this way (marked slow).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CONTAINERS_CONF = ROOT / "scripts" / "container" / "containers.conf"
#: Label on every pod and volume this script makes, so that `down` finds them.
LABEL = "posbfl-testbed.k8s-play"
CLUSTER_DOMAIN = "svc.cluster.local"
_VAR = re.compile(r"\$\((\w+)\)")


class PlayError(Exception):
    """A one-line reason the rehearsal cannot go on."""


# ------------------------------------------------------------------- manifests -> pods
def load_manifests(k8s_dir: Path = K8S) -> list[dict]:
    """What ``kubectl apply -f k8s/`` applies, in its order."""
    docs = []
    for path in sorted(k8s_dir.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def named(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def containers_of(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def service_aliases(docs: list[dict], deployment: dict) -> list[str]:
    """The DNS names of the Services whose selector picks ``deployment``'s pods."""
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    names = []
    for svc in named(docs, "Service").values():
        sel = svc["spec"].get("selector") or {}
        if sel and all(labels.get(k) == v for k, v in sel.items()):
            name, ns = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
            names += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.{CLUSTER_DOMAIN}"]
    return names


def pod_of(name: str, template: dict, namespace: str | None) -> dict:
    meta = {"name": name, "labels": {**template.get("metadata", {}).get("labels", {}), LABEL: "1"}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(template["spec"])}


def write_files(dest: Path, files: dict[str, bytes], items: list[dict] | None, what: str) -> None:
    """The files a configMap or secret volume projects: every key, or only ``items``."""
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)
    for it in items or [{"key": k, "path": k} for k in files]:
        if it["key"] not in files:
            raise PlayError(f"{what} has no key {it['key']!r}")
        target = dest / it["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        target.write_bytes(files[it["key"]])
        target.chmod(0o444)  # Kubernetes gives such files to fsGroup; here: readable by all


def file_volumes(pod: dict, configmaps: dict[str, dict], secrets: dict[str, Path], state: Path) -> None:
    """configMap and secret volumes -> hostPath folders under ``state`` with their files."""
    pod_name = pod["metadata"]["name"]
    for vol in pod["spec"].get("volumes", []):
        dest = state / "files" / pod_name / vol["name"]
        if "configMap" in vol:
            src = vol.pop("configMap")
            cm = configmaps.get(src["name"])
            if cm is None:
                raise PlayError(f"pod {pod_name} mounts ConfigMap {src['name']!r}, which the manifests do not define")
            files = {k: v.encode() for k, v in cm.get("data", {}).items()}
            files |= {k: base64.b64decode(v) for k, v in cm.get("binaryData", {}).items()}
            write_files(dest, files, src.get("items"), f"ConfigMap {src['name']!r}")
        elif "secret" in vol:
            src = vol.pop("secret")
            name = src["secretName"]
            if name not in secrets:
                raise PlayError(f"the manifests mount Secret {name!r}: pass --secret {name}=DIR (a folder with its files)")
            files = {p.name: p.read_bytes() for p in sorted(secrets[name].iterdir()) if p.is_file()}
            write_files(dest, files, src.get("items"), f"Secret {name!r} ({secrets[name]})")
        else:
            continue
        vol["hostPath"] = {"path": str(dest), "type": "Directory"}


def private_volumes(pod: dict) -> None:
    """emptyDir volumes -> claims ``<pod>-<volume>``, made (and removed) with the pod's."""
    for vol in pod["spec"].get("volumes", []):
        if vol.pop("emptyDir", None) is not None:
            vol["persistentVolumeClaim"] = {"claimName": f"{pod['metadata']['name']}-{vol['name']}"}


def unpublish_ports(spec: dict) -> None:
    for c in containers_of(spec):
        numbers = {p["name"]: p["containerPort"] for p in c.pop("ports", []) if "name" in p}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            for action in ("httpGet", "tcpSocket"):
                target = c.get(probe, {}).get(action)
                if target and isinstance(target.get("port"), str):
                    target["port"] = numbers[target["port"]]


def expand_variables(pod: dict) -> None:
    """$(VAR) in command and args: variables with a value, or the pod's name or namespace."""
    meta = pod["metadata"]
    fields = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", "default")}
    for c in containers_of(pod["spec"]):
        env = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") in fields:
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for key in ("command", "args"):
            if key in c:
                c[key] = [_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in c[key]]


def plan(docs: list[dict], secrets: dict[str, Path], state: Path, only: set[str] | None = None) -> list[tuple[str, dict]]:
    """The pods to play, in order: [(workload name, Pod)]. Deployments first (their Services
    become host aliases of the rest), then StatefulSets, then Jobs."""
    configmaps = named(docs, "ConfigMap")
    kinds = ("Deployment", "StatefulSet", "Job")
    unknown = sorted((only or set()) - {n for k in kinds for n in named(docs, k)})
    if unknown:
        raise PlayError(f"--only names no Deployment, StatefulSet or Job of the manifests: {', '.join(unknown)}")
    out = []
    for kind in kinds:
        for name, wl in named(docs, kind).items():
            if only is not None and name not in only:
                continue
            ns = wl["metadata"].get("namespace")
            tpl = wl["spec"]["template"]
            if kind == "Deployment":
                pods = [pod_of(f"{name}-pod-0", tpl, ns)]  # podman's own name for it
            elif kind == "Job":
                pods = [pod_of(f"{name}-play", tpl, ns)]
            else:
                pods = []
                for i in range(wl["spec"].get("replicas", 1)):
                    pod = pod_of(f"{name}-{i}", tpl, ns)
                    for vct in wl["spec"].get("volumeClaimTemplates", []):
                        vname = vct["metadata"]["name"]
                        pod["spec"].setdefault("volumes", []).append(
                            {"name": vname, "persistentVolumeClaim": {"claimName": f"{vname}-{name}-{i}"}}
                        )
                    pods.append(pod)
            for pod in pods:
                file_volumes(pod, configmaps, secrets, state)
                private_volumes(pod)
                unpublish_ports(pod["spec"])
                expand_variables(pod)
                out.append((name, pod))
    return out


def claims_of(spec: dict) -> list[str]:
    return [v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v]


def owner_of(spec: dict) -> tuple[int, int] | None:
    """(uid, gid) that Kubernetes would make the pod's volumes writable for: user, fsGroup."""
    sc = spec.get("securityContext", {})
    return (sc.get("runAsUser", 0), sc["fsGroup"]) if "fsGroup" in sc else None


# ------------------------------------------------------------------------------- podman
def podman_env() -> dict[str, str]:
    """The environment for podman: the project's containers.conf (runc, no default ulimits:
    what this testbed's CI machine needs) unless CONTAINERS_CONF names another."""
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}


class Podman:
    def __init__(self) -> None:
        exe = shutil.which("podman")
        if exe is None:
            raise PlayError("podman is not installed (Debian: apt-get install podman catatonit)")
        self.exe = exe
        self.env = podman_env()

    def __call__(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.exe, *args], input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            raise PlayError(f"podman {' '.join(args[:2])}: {lines[-1] if lines else f'exit code {proc.returncode}'}")
        return proc

    def exists(self, what: str, name: str) -> bool:
        return self(what, "exists", name, check=False).returncode == 0

    def pod_ip(self, pod: str) -> str:
        infra = json.loads(self("pod", "inspect", pod).stdout)
        infra = infra[0] if isinstance(infra, list) else infra
        fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        ips = self("inspect", "--format", fmt, infra["InfraContainerID"]).stdout.split()
        if not ips:
            raise PlayError(f"pod {pod} has no IP address on podman's network")
        return ips[0]

    def make_volume(self, name: str, owner: tuple[int, int] | None) -> None:
        if self.exists("volume", name):
            return
        opts = ["--opt", f"o=uid={owner[0]},gid={owner[1]}"] if owner else []
        self("volume", "create", "--label", f"{LABEL}=1", *opts, name)


def up(docs: list[dict], secrets: dict[str, Path], state: Path, only: set[str] | None = None, podman: Podman | None = None) -> tuple[dict[str, str], list[str]]:
    """Play the manifests: ({pod name: IP}, [why a workload was left out])."""
    podman = podman or Podman()
    deployments = named(docs, "Deployment")
    aliases: dict[str, list[str]] = {}  # IP -> a Service's DNS names
    ips: dict[str, str] = {}
    skipped: list[str] = []
    for workload, pod in plan(docs, secrets, state, only):
        name = pod["metadata"]["name"]
        missing = [c["image"] for c in containers_of(pod["spec"]) if not podman.exists("image", c["image"])]
        if missing:
            skipped.append(f"{name}: image {', '.join(missing)} is not in podman's local store")
            continue
        for claim in claims_of(pod["spec"]):
            podman.make_volume(claim, owner_of(pod["spec"]))
        if aliases:
            pod["spec"]["hostAliases"] = [{"ip": ip, "hostnames": names} for ip, names in aliases.items()]
        podman("kube", "play", "-", input=yaml.safe_dump(pod, sort_keys=False))
        ips[name] = podman.pod_ip(name)
        if workload in deployments and (names := service_aliases(docs, deployments[workload])):
            aliases[ips[name]] = names
    return ips, skipped


def down(podman: Podman | None = None) -> None:
    """Remove the pods and volumes that ``up`` made (by their label)."""
    podman = podman or Podman()
    pods = podman("pod", "ps", "-q", "--filter", f"label={LABEL}=1").stdout.split()
    if pods:
        podman("pod", "rm", "-f", "-t", "0", *pods)
    vols = podman("volume", "ls", "-q", "--filter", f"label={LABEL}=1").stdout.split()
    if vols:
        podman("volume", "rm", "-f", *vols)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="play the manifests")
    p_up.add_argument("--k8s", type=Path, default=K8S, help="folder of manifests (default: k8s/)")
    p_up.add_argument("--secret", action="append", default=[], metavar="NAME=DIR",
                      help="a Secret's files, e.g. bfl-operator=DIR with operator.key and operator.pub")
    p_up.add_argument("--only", help="comma-separated workloads to play (default: all)")
    p_up.add_argument("--state", type=Path, default=Path("runs/k8s-play"),
                      help="where the configMap and secret files go (default: runs/k8s-play)")
    sub.add_parser("down", help="remove the pods and volumes that 'up' made")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "down":
            down()
            return 0
        secrets = {}
        for s in args.secret:
            name, sep, path = s.partition("=")
            if not sep or not name or not Path(path).is_dir():
                raise PlayError(f"--secret {s!r}: expected NAME=DIR with an existing folder")
            secrets[name] = Path(path).resolve()
        only = set(args.only.split(",")) if args.only else None
        ips, skipped = up(load_manifests(args.k8s), secrets, args.state.resolve(), only)
    except (PlayError, OSError, yaml.YAMLError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in skipped:
        print(f"left out {line}", file=sys.stderr)
    for pod, ip in ips.items():
        print(f"{pod}\t{ip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
