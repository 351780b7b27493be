"""Mosquitto configuration for real deployments, and a local Mosquitto launcher for tests.

* :func:`render_config` -- a mosquitto.conf (2.x syntax; tested with 2.0.11): one listener,
  size limits, password file + ACL, optional persistence and TLS, log to stderr.
* :func:`render_acl` -- the per-device ACL: username == device id; a device may publish only
  under its own id, everybody reads the run tree, the operator writes genesis and commands.
* :func:`start_mosquitto` -- run ``mosquitto -c <rendered conf>`` as a child process.
* ``python -m broker.mosquitto render --devices d00,d01 --out DIR`` writes conf + acl.

Topic layout (fixed; ``R`` = run topic root ``bfl/v1``, ``<run>`` = run id, ``%u`` = username)::

    R/<run>/<kind>/<device_id>[/...]   kind in wtx vtx block blob sync chain head report ack evidence (device)
    R/devices/<device_id>/hello|status                                             (device)
    R/<run>/genesis                                                                (operator)
    R/<run>/cmd/<device_id>[/...]                       (operator writes; only that device reads)

Mosquitto ACL semantics relied on (mosquitto.conf(5), acl_file):
``topic`` lines before any ``user`` line apply to anonymous clients only; lines after
``user NAME`` apply to that username; ``pattern`` lines apply to *every* client, with ``%u``
(username) / ``%c`` (client id) substituted, and ``%u`` must be a whole topic level. ``+`` and
``#`` are allowed as in subscriptions (``a/#`` also matches ``a``). ``read`` is enforced per
delivered message (mosquitto 2.0 does not check SUBSCRIBE filters against acl_file), so a
device may subscribe to ``bfl/v1/<run>/#`` and simply never receives other devices'
commands. Publishes that the ACL denies are silently dropped (QoS 1 is still PUBACKed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from broker import BrokerError, free_port, wait_for_port

__all__ = [
    "DEVICE_KINDS",
    "MosquittoProcess",
    "find_mosquitto",
    "mosquitto_version",
    "make_password_file",
    "render_acl",
    "render_config",
    "start_mosquitto",
]

#: Per-run message kinds a device publishes under its own id: bfl/v1/<run>/<kind>/<device_id>/...
#: Must cover edge_agent.protocol.messages.RUN_KINDS (a test checks it).
DEVICE_KINDS: tuple[str, ...] = ("wtx", "vtx", "block", "blob", "sync", "chain", "head", "report", "ack", "evidence")
MIB = 1024 * 1024
#: Room for fixed header + topic + packet id: agents keep payloads <= max_packet_size - this.
PACKET_HEADROOM = 64 * 1024
_DEFAULT_MOSQUITTO = "/usr/sbin/mosquitto"
#: How the shipped examples broker/mosquitto/{mosquitto.conf,acl} are rendered (port 1883, d00..d19).
EXAMPLE_CONF_KWARGS: dict[str, Any] = {
    "bind": "0.0.0.0",
    "acl_file": "/etc/mosquitto/bfl/acl",
    "password_file": "/etc/mosquitto/bfl/passwd",
    "max_packet_mb": 64,
    "persistence_dir": "/var/lib/mosquitto",
    "allow_anonymous": False,
}
EXAMPLE_DEVICES: tuple[str, ...] = tuple(f"d{i:02d}" for i in range(20))
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@=-]{1,128}$")
_TLS_KEYS = {"cafile", "capath", "certfile", "keyfile", "require_certificate",
             "use_identity_as_username", "tls_version", "port"}


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"bad {kind} {name!r}: use 1-128 chars of letters, digits and _ . : @ = - "
            "(no spaces, '/', '+' or '#': it is a topic level and a mosquitto username)"
        )
    return name


def _check_root(root: str) -> str:
    root = root.strip("/")
    if not root or any(c in root for c in "+# ") or "//" in root:
        raise ValueError(f"bad topic root {root!r}: a plain topic prefix like 'bfl/v1' is expected")
    return root


def _fmt_bool(v: bool) -> str:
    return "true" if v else "false"


def max_packet_bytes(max_packet_mb: float) -> int:
    """``max_packet_size`` in bytes for ``max_packet_mb`` MiB (whole MQTT packet)."""
    n = int(round(float(max_packet_mb) * MIB))
    if n < 1024:
        raise ValueError(f"max_packet_mb={max_packet_mb} is too small (>= 1 KiB expected)")
    if n > 268435455 + 5:
        raise ValueError(f"max_packet_mb={max_packet_mb} exceeds MQTT's 256 MiB packet limit")
    return n


def render_config(
    port: int,
    *,
    bind: str = "0.0.0.0",
    acl_file: str | os.PathLike[str] | None = None,
    password_file: str | os.PathLike[str] | None = None,
    max_packet_mb: float = 64,
    persistence_dir: str | os.PathLike[str] | None = None,
    tls: Mapping[str, Any] | None = None,
    allow_anonymous: bool,
    run_as: str | None = None,
) -> str:
    """Return a mosquitto.conf (2.x) for one broker of a deployment.

    max_packet_mb: ``max_packet_size`` in MiB: the limit on a whole MQTT packet (fixed header +
      topic + packet id + payload). A client sending a larger packet is disconnected and the
      packet is dropped. (``message_size_limit`` is deprecated since mosquitto 2.0 and unused.)
      Agents should keep payloads <= max_packet_size - PACKET_HEADROOM.
    tls: {"certfile", "keyfile", optional "cafile"/"capath", "require_certificate",
      "use_identity_as_username", "tls_version", "port"}. Without "port" the main listener
      speaks TLS; with "port" a second, TLS listener is added beside the plain one.
    run_as: the ``user`` option (only effective when mosquitto is started as root).
    """
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"bad port {port!r}")
    limit = max_packet_bytes(max_packet_mb)
    lines = [
        "# mosquitto.conf for the PoS-BFL testbed (mosquitto 2.x) -- rendered by broker.mosquitto",
        "# Run: mosquitto -c THIS_FILE      (-v for verbose logs)",
        "",
        "# Authentication/ACL options below apply to every listener.",
        "per_listener_settings false",
    ]
    if run_as:
        lines += ["# When started as root, drop privileges to this user.", f"user {run_as}"]
    lines += ["", f"listener {port} {bind}".rstrip(), "protocol mqtt"]
    tls_lines: list[str] = []
    if tls:
        unknown = set(tls) - _TLS_KEYS
        if unknown:
            raise ValueError(f"unknown tls option(s): {', '.join(sorted(unknown))}")
        if not tls.get("certfile") or not tls.get("keyfile"):
            raise ValueError("tls needs at least certfile and keyfile")
        for key in ("cafile", "capath", "certfile", "keyfile"):
            if tls.get(key):
                tls_lines.append(f"{key} {os.fspath(tls[key])}")
        if "require_certificate" in tls:
            tls_lines.append(f"require_certificate {_fmt_bool(bool(tls['require_certificate']))}")
        if "use_identity_as_username" in tls:
            tls_lines.append(f"use_identity_as_username {_fmt_bool(bool(tls['use_identity_as_username']))}")
        tls_lines.append(f"tls_version {tls.get('tls_version') or 'tlsv1.2'}")
        if tls.get("port"):
            lines += ["", "# TLS listener", f"listener {int(tls['port'])} {bind}".rstrip(), "protocol mqtt"]
        else:
            lines.append("# TLS on this listener")
        lines += tls_lines

    lines += [
        "",
        "# --- security ---",
        "# Mosquitto 2.x refuses anonymous clients unless allowed explicitly.",
        f"allow_anonymous {_fmt_bool(allow_anonymous)}",
    ]
    if password_file is not None:
        lines += [
            "# Create/extend with: mosquitto_passwd -c FILE d00  (then: mosquitto_passwd -b FILE d01 SECRET)",
            f"password_file {os.fspath(password_file)}",
        ]
    if acl_file is not None:
        lines += ["# Username == device id; see the ACL file for the topic layout.",
                  f"acl_file {os.fspath(acl_file)}"]

    lines += [
        "",
        "# --- size limits ---",
        f"# Whole-packet limit ({float(max_packet_mb):g} MiB, header + topic + payload): a client sending a",
        "# larger packet is disconnected and the packet dropped. Agents enforce their own payload",
        f"# limit below it (payload <= max_packet_size - {PACKET_HEADROOM}). message_size_limit is",
        "# deprecated in mosquitto 2.x and not used.",
        f"max_packet_size {limit}",
        "max_inflight_messages 20",
        "max_queued_messages 1000",
        "set_tcp_nodelay true",
        "",
        "# --- persistence (retained genesis/heads/status, durable sessions) ---",
    ]
    if persistence_dir is not None:
        loc = os.fspath(persistence_dir)
        if not loc.endswith("/"):
            loc += "/"
        lines += ["persistence true", f"persistence_location {loc}", "autosave_interval 60"]
    else:
        lines += ["persistence false"]
    lines += [
        "",
        "# --- logging ---",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "log_timestamp true",
        "",
    ]
    return "\n".join(lines)


def render_acl(
    run_topic_root: str = "bfl/v1",
    *,
    devices: Sequence[str],
    operator: str = "operator",
    private_cmd: bool = True,
) -> str:
    """Return a mosquitto acl_file: each device (username = device id) writes only its own
    subtrees (``pattern write`` with ``%u``), reads the run tree (a ``user`` block per device),
    and the operator writes genesis + commands and reads everything.

    private_cmd: a device reads only its own ``<run>/cmd/<id>`` (reads are then granted per
    kind); False grants every device read on ``<root>/#``.
    Users not listed here (even with a password) can only write their own subtrees.
    """
    root = _check_root(run_topic_root)
    _check_name("operator name", operator)
    devs = [_check_name("device id", d) for d in devices]
    if len(set(devs)) != len(devs):
        raise ValueError("duplicate device ids")
    if operator in devs:
        raise ValueError(f"device id {operator!r} collides with the operator username")

    if private_cmd:
        reads = [f"topic read {root}/+/genesis"]
        reads += [f"topic read {root}/+/{kind}/#" for kind in DEVICE_KINDS]
        reads += [f"topic read {root}/devices/#"]
    else:
        reads = [f"topic read {root}/#"]

    out = [
        "# mosquitto acl_file for the PoS-BFL testbed -- rendered by broker.mosquitto",
        "# Username == device id (password file: mosquitto_passwd). Anonymous clients get no access.",
        "#",
        "# Topic layout: <root>/<run>/<kind>/<device_id>[/...] for the kinds a device publishes",
        f"# ({' '.join(DEVICE_KINDS)}), <root>/devices/<device_id>/hello|status,",
        "# <root>/<run>/genesis and <root>/<run>/cmd/<device_id> (operator only).",
        "#",
        "# 'pattern' lines apply to every user (%u = its username, a whole topic level);",
        "# 'topic' lines after 'user X' apply to X only. '+' and '#' work as in subscriptions.",
        "# Reads are checked per delivered message, so a wide subscription such as",
        f"# {root}/<run>/# is accepted; what the user may not read is just not delivered.",
        "# Denied publishes are dropped silently (QoS 1 is still acknowledged).",
        "",
        "# --- every device writes only under its own id ---",
    ]
    out += [f"pattern write {root}/+/{kind}/%u/#" for kind in DEVICE_KINDS]
    out += [
        "# hello + status (status is retained and is also the last-will topic)",
        f"pattern write {root}/devices/%u/#",
    ]
    if private_cmd:
        out += ["# each device reads its own commands only (malicious-role orders are private)",
                f"pattern read {root}/+/cmd/%u/#"]
    out += ["", f"# --- devices ({len(devs)}): read access to the shared tree ---"]
    for d in devs:
        out += [f"user {d}", *reads, ""]
    out += [
        "# --- the operator (orchestrator): genesis and per-device commands, reads all ---",
        f"user {operator}",
        f"topic read {root}/#",
        f"topic write {root}/+/genesis",
        f"topic write {root}/+/cmd/#",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# local process
# --------------------------------------------------------------------------------------------
def find_mosquitto() -> str:
    """Path of the mosquitto binary; BrokerError (one line) if it is not installed."""
    exe = shutil.which("mosquitto")
    if exe is None and os.access(_DEFAULT_MOSQUITTO, os.X_OK):
        exe = _DEFAULT_MOSQUITTO
    if exe is None:
        raise BrokerError("mosquitto not found: sudo apt-get install mosquitto")
    return exe


def mosquitto_version() -> str | None:
    """``mosquitto version X.Y.Z`` as the installed binary prints it (None if it cannot)."""
    try:
        proc = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=10)
    except (BrokerError, OSError, subprocess.TimeoutExpired):
        return None
    first = (proc.stdout or proc.stderr).splitlines()[:1]
    return first[0].strip() if first else None


def find_mosquitto_passwd() -> str:
    exe = shutil.which("mosquitto_passwd")
    if exe is None and os.access("/usr/bin/mosquitto_passwd", os.X_OK):
        exe = "/usr/bin/mosquitto_passwd"
    if exe is None:
        raise BrokerError("mosquitto_passwd not found: sudo apt-get install mosquitto")
    return exe


def make_password_file(path: str | os.PathLike[str], users: Mapping[str, str]) -> Path:
    """(Re)create a mosquitto password file with ``mosquitto_passwd -b`` (hashed passwords)."""
    exe = find_mosquitto_passwd()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        p.unlink()
    p.touch(mode=0o600)
    for user, password in users.items():
        _check_name("username", user)
        r = subprocess.run([exe, "-b", str(p), user, password], capture_output=True, text=True)
        if r.returncode != 0:
            msg = " ".join((r.stderr or r.stdout).split()) or f"exit {r.returncode}"
            raise BrokerError(f"mosquitto_passwd failed for {user!r}: {msg}")
    return p


def _log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class MosquittoProcess:
    """A mosquitto child process started by :func:`start_mosquitto`."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str, port: int, conf: Path, log: Path) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.conf_path = conf
        self.log_path = log

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """The broker's log (stderr) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL if needed. Idempotent."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> "MosquittoProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<MosquittoProcess pid={self.proc.pid} {self.url} {'running' if self.running else 'stopped'}>"


def start_mosquitto(
    tmpdir: str | os.PathLike[str],
    port: int = 0,
    *,
    timeout: float = 10.0,
    **render_kwargs: Any,
) -> MosquittoProcess:
    """Write ``tmpdir/mosquitto.conf`` (from render_config(**render_kwargs)) and run mosquitto.

    port 0 picks a free port. bind defaults to 127.0.0.1 here; allow_anonymous defaults to True
    unless a password_file is given. When run as root, mosquitto stays the current user (so it
    can read files in tmpdir). The log goes to ``tmpdir/mosquitto.log``. Returns once the port
    accepts connections; BrokerError (one line) otherwise.
    """
    exe = find_mosquitto()
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    render_kwargs.setdefault("bind", "127.0.0.1")
    render_kwargs.setdefault("allow_anonymous", render_kwargs.get("password_file") is None)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        import pwd

        render_kwargs.setdefault("run_as", pwd.getpwuid(os.geteuid()).pw_name)
    bind = render_kwargs["bind"]
    host = "127.0.0.1" if bind in ("0.0.0.0", "", None) else ("::1" if bind == "::" else bind)
    conf = d / "mosquitto.conf"
    log = d / "mosquitto.log"

    attempts = 3 if port == 0 else 1
    last = ""
    for _ in range(attempts):
        p = port or free_port(host)
        conf.write_text(render_config(p, **render_kwargs))
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                last = _log_tail(log) or f"exit code {proc.returncode}"
                break
            try:
                wait_for_port(host, p, 0.2)
                return MosquittoProcess(proc, host, p, conf, log)
            except BrokerError:
                pass
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait(5)
                raise BrokerError(f"mosquitto did not listen on {host}:{p} within {timeout:g}s: {_log_tail(log)}")
        if "in use" not in last.lower():
            break
    raise BrokerError(f"mosquitto failed to start: {last}")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _split_devices(text: str) -> list[str]:
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"([A-Za-z_-]*)(\d+)\.\.\1?(\d+)", part)
        if m:  # d00..d19
            prefix, a, b = m.group(1), m.group(2), m.group(3)
            width = len(a)
            out += [f"{prefix}{i:0{width}d}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(part)
    return out


_EXAMPLE_HEADER = """\
# EXAMPLE for a 20-device deployment (d00..d19). Regenerate with:
#   python -m broker.mosquitto examples
# or render your own: python -m broker.mosquitto render --devices d00..d19 --out DIR
# Install: copy to /etc/mosquitto/bfl/, create the password file (username = device id):
#   mosquitto_passwd -c /etc/mosquitto/bfl/passwd operator
#   mosquitto_passwd -b /etc/mosquitto/bfl/passwd d00 SECRET   # ... one per device
# then run: mosquitto -c /etc/mosquitto/bfl/mosquitto.conf

"""


def write_examples(directory: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """(Re)write the shipped example files (default: broker/mosquitto/ next to this module)."""
    d = Path(directory) if directory is not None else Path(__file__).with_name("mosquitto")
    d.mkdir(parents=True, exist_ok=True)
    conf, acl = d / "mosquitto.conf", d / "acl"
    conf.write_text(_EXAMPLE_HEADER + render_config(1883, **EXAMPLE_CONF_KWARGS))
    acl.write_text(_EXAMPLE_HEADER + render_acl(devices=EXAMPLE_DEVICES))
    return conf, acl


def _cmd_render(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    devices = _split_devices(args.devices)
    acl_path = Path(args.acl_path) if args.acl_path else (out / "acl").resolve()
    pw_path = Path(args.password_file) if args.password_file else (out / "passwd").resolve()
    tls = None
    if args.tls_certfile or args.tls_keyfile:
        tls = {"certfile": args.tls_certfile, "keyfile": args.tls_keyfile}
        if args.tls_cafile:
            tls["cafile"] = args.tls_cafile
        if args.tls_port:
            tls["port"] = args.tls_port
    conf = render_config(
        args.port, bind=args.bind, acl_file=acl_path, password_file=pw_path,
        max_packet_mb=args.max_packet_mb, persistence_dir=args.persistence_dir, tls=tls,
        allow_anonymous=args.allow_anonymous,
    )
    acl = render_acl(args.root, devices=devices, operator=args.operator,
                     private_cmd=not args.public_cmd)
    (out / "mosquitto.conf").write_text(conf)
    (out / "acl").write_text(acl)
    users = " ".join([args.operator, *devices])
    print(f"wrote {out / 'mosquitto.conf'} and {out / 'acl'} ({len(devices)} devices)")
    print(
        "next: create the password file (one password per device, username = device id):\n"
        f"  mosquitto_passwd -c {pw_path} {args.operator}\n"
        f"  umask 077; for u in {' '.join(devices) or 'd00 d01'}; do p=$(openssl rand -hex 12); "
        f"mosquitto_passwd -b {pw_path} \"$u\" \"$p\"; echo \"$u $p\" >> device-passwords.txt; done\n"
        f"  (users: {users}; give each agent its own line of device-passwords.txt)\n"
        f"then: mosquitto -c {out / 'mosquitto.conf'}"
    )
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m broker.mosquitto",
                                description="Render Mosquitto config + per-device ACL for PoS-BFL.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="write mosquitto.conf and acl into a directory")
    r.add_argument("--devices", required=True, help="comma-separated device ids, ranges allowed: d00..d19")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--port", type=int, default=1883)
    r.add_argument("--bind", default="0.0.0.0")
    r.add_argument("--root", default="bfl/v1", help="run topic root (default bfl/v1)")
    r.add_argument("--operator", default="operator", help="operator username (default operator)")
    r.add_argument("--max-packet-mb", type=float, default=64)
    r.add_argument("--persistence-dir", default=None)
    r.add_argument("--acl-path", default=None, help="acl path written into the conf (default OUT/acl)")
    r.add_argument("--password-file", default=None, help="password file path (default OUT/passwd)")
    r.add_argument("--allow-anonymous", action="store_true", help="also accept clients without a username")
    r.add_argument("--public-cmd", action="store_true", help="let every device read all cmd topics")
    r.add_argument("--tls-certfile")
    r.add_argument("--tls-keyfile")
    r.add_argument("--tls-cafile")
    r.add_argument("--tls-port", type=int, default=None, help="extra TLS listener port (default: TLS on --port)")
    e = sub.add_parser("examples", help="rewrite the shipped example files broker/mosquitto/{mosquitto.conf,acl}")
    e.add_argument("--out", default=None, help="directory (default: the package's broker/mosquitto/)")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        if args.cmd == "examples":
            for f in write_examples(args.out):
                print(f"wrote {f}")
            return 0
        return _cmd_render(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
