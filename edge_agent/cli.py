"""`bfl-agent`: run a PoS-BFL device, or make its key."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from .protocol.crypto import KeyPair, fingerprint
from .protocol.messages import valid_id

app = typer.Typer(add_completion=False, help="PoS-BFL edge agent (worker / validator / miner).", no_args_is_help=True)


def fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def read_pubkey(value: str) -> str:
    """A hex public key, or a file holding one."""
    text = value.strip()
    if len(text) != 64 and Path(text).is_file():
        text = Path(text).read_text().strip()
    try:
        if len(bytes.fromhex(text)) == 32:
            return text.lower()
    except ValueError:
        pass
    fail(f"--operator-key {value!r}: expected 64 hex characters or a file holding them")
    return ""


@app.command()
def keygen(out: Path = typer.Option(..., "--out", help="Where to write the device's secret key (mode 0600).")):
    """Create a device key and print its public key (give that to the operator)."""
    if out.exists():
        fail(f"{out} exists; refusing to overwrite a key")
    key = KeyPair.generate()
    key.save(out)
    typer.echo(key.public_hex)


@app.command()
def run(
    device_id: str = typer.Option(..., "--id", envvar="BFL_DEVICE_ID", help="Device id, e.g. d07."),
    key_file: Path = typer.Option(..., "--key", envvar="BFL_KEY", help="Ed25519 key file (bfl-agent keygen)."),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", envvar="BFL_BROKER", help="mqtt://HOST:PORT or mqtts://"),
    operator_key: str = typer.Option(..., envvar="BFL_OPERATOR_KEY", help="The operator's public key (hex or file)."),
    workdir: Path = typer.Option(Path("bfl-agent-data"), envvar="BFL_WORKDIR", help="Chain and blob storage."),
    data_dir: Optional[Path] = typer.Option(None, envvar="BFL_DATA_DIR", help="Dataset directory (IDX files)."),
    run_id: Optional[str] = typer.Option(None, "--run", envvar="BFL_RUN", help="Only join this run."),
    exit_after_run: bool = typer.Option(False, help="Exit when the run's last round is done."),
    threads: int = typer.Option(1, envvar="BFL_THREADS", help="CPU threads for training and inference."),
    username: Optional[str] = typer.Option(None, envvar="BFL_MQTT_USERNAME", help="MQTT username (default: the id)."),
    password_file: Optional[Path] = typer.Option(None, envvar="BFL_MQTT_PASSWORD_FILE"),
    ca_file: Optional[Path] = typer.Option(None, envvar="BFL_MQTT_CA_FILE", help="CA bundle for mqtts://."),
    caps: Optional[str] = typer.Option(
        None, envvar="BFL_CAPS", help="Roles this device takes: train,validate,mine (default: train only if torch is installed)."
    ),
    create_key: bool = typer.Option(
        False, "--create-key", envvar="BFL_CREATE_KEY", help="Create --key if it does not exist yet (first boot of a device)."
    ),
    metrics_port: int = typer.Option(
        0, envvar="BFL_METRICS_PORT", help="Serve Prometheus metrics on this port (0: off).", min=0, max=65535
    ),
    metrics_addr: str = typer.Option("0.0.0.0", envvar="BFL_METRICS_ADDR", help="Address the metrics server binds."),
    metrics_linger: float = typer.Option(
        0.0, envvar="BFL_METRICS_LINGER", help="With --exit-after-run: keep serving metrics this many seconds after the run."
    ),
    keep_rounds: int = typer.Option(
        0,
        envvar="BFL_KEEP_ROUNDS",
        min=0,
        help="Delete model blobs named only by blocks more than N rounds old (0: keep all). "
        "A peer that falls further behind then needs another device to fetch them from.",
    ),
    trainer: Optional[str] = typer.Option(
        None,
        envvar="BFL_TRAINER",
        help="The host's trainer service, unix:PATH (default: this host's, started on first use; see `bfl-agent trainer`).",
    ),
    train_device: str = typer.Option(
        "auto", envvar="BFL_TRAIN_DEVICE", help="Where training runs: auto (CUDA when torch sees a GPU), cpu or cuda."
    ),
    shared_cache: Optional[Path] = typer.Option(
        None,
        envvar="BFL_SHARED_CACHE",
        help="Co-located agents of one operator: share stored blobs and aggregates in DIR (bfl run sets it).",
    ),
    blob_group: Optional[str] = typer.Option(
        None,
        envvar="BFL_BLOB_GROUP",
        help="With --shared-cache on Mosquitto: receive model blobs through the shared subscription "
        "$share/NAME/..., once per host instead of once per agent (bfl run sets it).",
    ),
    log_level: str = typer.Option("INFO", envvar="BFL_LOG_LEVEL"),
):
    """Connect to the broker, announce this device, and take part in runs it is admitted to."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not valid_id(device_id):
        fail(f"--id {device_id!r}: use letters, digits, '-', '_' or '.' (at most 64)")
    if create_key and not key_file.exists():
        try:
            KeyPair.generate().save(key_file)
        except OSError as exc:
            fail(f"--key {key_file}: cannot create it ({exc.strerror})")
        logging.getLogger("bfl.agent").info("%s: created a new key in %s", device_id, key_file)
    if not key_file.is_file():
        fail(f"--key {key_file}: no such file (create one with `bfl-agent keygen --out {key_file}`)")
    try:
        key = KeyPair.load(key_file)
    except ValueError as exc:
        fail(str(exc))
    from .compute import TRAIN_DEVICES
    from .protocol.genesis import CAPABILITIES

    capabilities = [c for c in caps.split(",") if c] if caps else None
    if capabilities is not None and (not capabilities or any(c not in CAPABILITIES for c in capabilities)):
        fail(f"--caps {caps!r}: a comma-separated subset of {','.join(CAPABILITIES)}")
    if blob_group is not None and (not valid_id(blob_group) or shared_cache is None):
        fail(f"--blob-group {blob_group!r}: letters, digits, '-', '_' or '.', and it needs --shared-cache")
    if train_device not in TRAIN_DEVICES:
        fail(f"--train-device {train_device!r}: one of {', '.join(TRAIN_DEVICES)}")
    password = password_file.read_text().strip() if password_file else None
    from .agent import Agent
    from .metrics import MetricsError
    from .transport import TransportError

    try:
        agent = Agent(
            device_id,
            key,
            broker,
            workdir,
            operator_pubkey=read_pubkey(operator_key),
            data_dir=data_dir,
            run=run_id,
            exit_after_run=exit_after_run,
            threads=threads,
            username=username,
            password=password,
            ca_file=str(ca_file) if ca_file else None,
            capabilities=capabilities,
            metrics=(metrics_addr, metrics_port) if metrics_port else None,
            metrics_linger=metrics_linger,
            keep_rounds=keep_rounds,
            trainer=trainer,
            train_device=train_device,
            shared_cache=shared_cache,
            blob_group=blob_group,
        )
        logging.getLogger("bfl.agent").info("%s: key fingerprint %s", device_id, fingerprint(key.public_hex))
        # SIGTERM (systemd, podman stop, Kubernetes; PID 1 in a container ignores it otherwise)
        signal.signal(signal.SIGTERM, lambda *_: agent.stop())
        agent.run_forever()
    except (TransportError, MetricsError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@app.command("trainer")
def trainer_service(
    socket_path: Optional[Path] = typer.Option(
        None, "--socket", envvar="BFL_TRAINER_SOCKET", help="Unix socket to listen on (default: this host's)."
    ),
    slots: int = typer.Option(0, min=0, help="Training jobs at once on the CPU (0: one per core this process may use)."),
    threads: int = typer.Option(1, min=1, help="CPU threads per job."),
    idle_exit: float = typer.Option(0.0, min=0.0, help="Exit after this many seconds without a job (0: never)."),
    log_level: str = typer.Option("INFO", envvar="BFL_LOG_LEVEL"),
):
    """Run the host's trainer service: the one place on this machine that holds torch and
    trains, at most --slots jobs at once (and one at a time on a GPU)."""
    from .compute import ComputeError, TrainerService, default_socket

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        fail("the trainer service needs torch: pip install -e '.[worker]'")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # inherited by the workers' fork server
        os.environ[var] = str(threads)
    svc = TrainerService(socket_path or default_socket(), slots or None, threads, idle_exit)
    signal.signal(signal.SIGTERM, lambda *_: svc.stopped.set())
    try:
        svc.start_workers()
        svc.serve_forever()
    except ComputeError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold after the first multi-MB buffer is freed, so that later
    model-sized buffers (blobs, decoded updates) come from the heap and stay resident after
    use; a fixed 1 MiB threshold hands them back to the OS (benchmarks/bench_round.py: the
    peak PSS of 20 agents)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _return_freed_memory()
    app()


if __name__ == "__main__":
    main()
