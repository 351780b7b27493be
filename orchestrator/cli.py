"""`bfl`: the operator's CLI. Creates an experiment, starts agents, injects faults, watches."""

from __future__ import annotations

import json
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import Optional

import typer

from edge_agent.ml.models import names as _arch_names

app = typer.Typer(add_completion=False, help="PoS-BFL testbed orchestrator.", no_args_is_help=True)
data_app = typer.Typer(add_completion=False, help="Datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


LOCAL_BROKERS = ("mosquitto", "embedded")  # --broker values that start one for the run


def fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def parse_roles(text: str) -> tuple[int, int, int]:
    try:
        w, v, m = (int(x) for x in text.split(","))
        return w, v, m
    except ValueError:
        fail(f"--roles {text!r}: expected three integers W,V,M such as 12,5,3")
        raise


def parse_deadlines(text: str) -> tuple[int, int, int]:
    try:
        t, v, m = (int(x) for x in text.split(","))
        if min(t, v, m) < 1:
            raise ValueError
        return t, v, m
    except ValueError:
        fail(f"--deadlines {text!r}: expected three positive integers TRAIN,VALIDATE,MINE in seconds")
        raise


#: options a config file may not set: where a run goes is chosen per invocation
_NOT_IN_CONFIG = ("config", "resume", "out", "overwrite")
#: what `bfl run --resume OUT` may set anew: how it runs here, not what it computes
_RESUME_MAY_SET = ("resume", "quiet", "broker", "threads", "train_slots", "train_device", "join_timeout",
                   "metrics_port", "metrics_addr", "metrics_targets")  # fmt: skip


def _load_config(ctx: typer.Context, param, value: Optional[Path]) -> Optional[Path]:
    """``--config FILE``: its settings become the defaults of this invocation, so options
    given on the command line override them (click's default_map)."""
    if value is not None:
        _apply_config(ctx, value, f"--config {value}")
    return value


def _load_resume(ctx: typer.Context, param, value: Optional[Path]) -> Optional[Path]:
    """``--resume OUT``: the stopped run's own config.toml is this invocation's settings."""
    if value is None:
        return value
    if not value.is_dir():
        fail(f"--resume {value}: no such run folder (the OUT of a stopped `bfl run`)")
    if not (value / "config.toml").is_file():
        fail(f"--resume {value}: not the folder of a `bfl run` (it has no config.toml)")
    _apply_config(ctx, value / "config.toml", f"--resume {value}: its config.toml")
    return value


def _apply_config(ctx: typer.Context, value: Path, what: str) -> None:
    import tomllib

    try:
        data = tomllib.loads(value.read_text())
    except OSError as exc:
        fail(f"{what}: cannot read it ({exc.strerror})")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        fail(f"{what}: not a TOML file ({exc})")
    table = data.get("run", data)  # the settings, at the top level or in a [run] table
    known = {p.name: p for p in ctx.command.params if p.name not in _NOT_IN_CONFIG}
    defaults = {}
    for key, v in table.items():
        name = key.replace("-", "_")
        if name not in known:
            fail(f"{what}: unknown setting {key!r}; the settings are `bfl {ctx.command.name}`'s options, e.g. devices = 20")
        v = ",".join(str(x) for x in v) if isinstance(v, list) else v
        try:  # checked here so that a wrong value is one line naming the file (typer's own check: a usage box)
            runtime = getattr(known[name], "get_runtime_param", None)
            if runtime is not None and not isinstance(v, bool):
                runtime().coerce(v, param=known[name], ctx=ctx)
        except Exception as exc:  # typer's BadParameter (its click is vendored)
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            fail(f"{what}: {key} = {v!r}: {' '.join(message.split())}")
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _write_config(path: Path, params: dict, header: str) -> None:
    """Every setting this invocation used (OUT/config.toml: ``bfl run --config`` repeats it;
    a sweep's reproduce.toml: ``bfl reproduce --resume`` continues it)."""
    import tomli_w

    kept = {k: str(v) if isinstance(v, Path) else v for k, v in sorted(params.items())
            if k not in _NOT_IN_CONFIG and v is not None}  # fmt: skip
    path.write_text(f"# {header}\n" + tomli_w.dumps(kept))


def _refuse_changes(ctx: typer.Context, may_set: tuple[str, ...], what: str) -> None:
    """``--resume``: one line for the first option given on the command line that is not
    among ``may_set`` (``what`` says which file the settings come from)."""
    params = {p.name: p for p in ctx.command.params}
    for name in ctx.params:
        if name not in may_set and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE":
            given = name if params[name].param_type_name == "argument" else "--" + name.replace("_", "-")
            fail(f"--resume continues {what}; {given} cannot change (start a new one for other settings)")


#: `bfl run --help` groups its options in these panels
_EXPERIMENT = partial(typer.Option, rich_help_panel="Experiment")
_DATA = partial(typer.Option, rich_help_panel="Data and model")
_ATTACKS = partial(typer.Option, rich_help_panel="Attacks")
_DEFENCE = partial(typer.Option, rich_help_panel="Defence (the paper's validation and consensus)")
_NETWORK = partial(typer.Option, rich_help_panel="Network and compute")
_METRICS = partial(typer.Option, rich_help_panel="Metrics")


def _terminate_as_interrupt() -> None:
    """SIGTERM (``kill``, a container or a service stopping) ends a run as Ctrl-C does: the
    finished rounds are written and the agents stopped, rather than orphaned."""
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends it at once
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    # and Ctrl-C is Ctrl-C even when bfl was started with SIGINT ignored (a background job of
    # a script): Python then installs no handler of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)


@app.command()
def run(
    ctx: typer.Context,
    config: Optional[Path] = _EXPERIMENT(
        None, is_eager=True, callback=_load_config,
        help="A TOML file of settings (the options below, e.g. devices = 20); options given here override it. "
        "Every run writes the config.toml it used into its folder.",
    ),  # fmt: skip
    resume: Optional[Path] = _EXPERIMENT(
        None, is_eager=True, callback=_load_resume, metavar="OUT",
        help="Continue the stopped run in OUT to its round count, with the settings of OUT/config.toml, from the "
        "agents' chains on disk (only how it runs here may be set anew: --threads, --broker, metrics, ...).",
    ),  # fmt: skip
    protocol: str = _EXPERIMENT("pos-bfl", metavar="CHOICE", help="pos-bfl | vanilla (FedAvg, no validation) | pfedme (Dinh et al. 2020)."),
    devices: int = _EXPERIMENT(20, help="Number of devices."),
    roles: str = _EXPERIMENT("12,5,3", help="Workers, validators, miners per round."),
    malicious: int = _ATTACKS(0, help="How many devices are malicious (chosen with --seed)."),
    malicious_ids: Optional[str] = _ATTACKS(
        None, help="Malicious devices by id instead, each with its own attack if given: d03=label_flip,d07."
    ),
    attack: str = _ATTACKS(
        "gaussian",
        help="gaussian (N(0,1) on every parameter) | sign_flip | scale | lazy | label_flip (poisoned training); "
        "invert_votes | equivocate | withhold_blob | false_head | junk_votes | blob_spam (a byzantine insider on the "
        "wire, docs/security.md).",
    ),
    rounds: int = _EXPERIMENT(10, help="Communication rounds (the paper runs 100)."),
    dataset: str = _DATA("mnist", metavar="CHOICE", help="mnist | fashion-mnist (offline, Debian's package)."),
    data_dir: Optional[Path] = _DATA(None, help="Directory with the IDX files."),
    model: str = _DATA(
        "cnn", metavar="CHOICE",
        help=" | ".join(n + " (the paper's)" * (n == "cnn") for n in _arch_names())
        + ": the architectures, one file each in edge_agent/ml/models/.",
    ),  # fmt: skip
    partition: str = _DATA("shards", metavar="CHOICE", help="shards (non-IID, the paper's) | iid | dirichlet."),
    alpha: float = _DATA(0.5, help="Dirichlet concentration for --partition dirichlet."),
    samples_per_device: Optional[int] = _DATA(None, help="Training samples per device (default: an even split)."),
    test_per_device: Optional[int] = _DATA(None, help="Test images per device (default 500)."),
    local_epochs: int = _DATA(5, help="Local epochs le."),
    batch_size: int = _DATA(10, help="Local mini-batch size B (the paper: 10)."),
    lr: float = _DATA(0.01, help="Local SGD learning rate (the paper: 0.01)."),
    vh: float = _DEFENCE(0.08, help="Validator threshold of the accuracy drop (Algorithm 1)."),
    vote_ref: str = _DEFENCE("median", metavar="CHOICE", help="Reference accuracy of the vote: median | global | trained."),
    loss_guard: int = _DEFENCE(10, help="Also vote negative when an update's loss exceeds this x the round median (0: Algorithm 1 only)."),
    aggregator: str = _DEFENCE("fedavg", metavar="CHOICE", help="G_j from the accepted updates: fedavg | median | trimmed_mean | multi_krum."),
    krum_f: Optional[int] = _DEFENCE(None, help="Multi-Krum's assumed number of attackers f (default: --malicious)."),
    knockout: int = _DEFENCE(3, help="Blacklist after this many consecutive rejected updates (0: never)."),
    deadlines: str = _DEFENCE("900,300,120", help="Phase deadlines TRAIN,VALIDATE,MINE in seconds."),
    broker: Optional[str] = _NETWORK(
        None,
        help="mqtt://HOST:PORT of an existing broker; 'mosquitto' (a local Mosquitto for this run) or 'embedded' "
        "(amqtt inside bfl). Default: mosquitto when installed, else embedded.",
    ),
    external: bool = _NETWORK(False, "--external", help="Use agents already connected to --broker instead of starting them."),
    operator_key: Optional[Path] = _NETWORK(None, help="Operator key file (created if missing)."),
    out: Optional[Path] = _EXPERIMENT(
        None, help="Output folder, new or empty (default: a new runs/TIME-RUNID, with runs/latest pointing at it)."
    ),
    overwrite: bool = _EXPERIMENT(False, "--overwrite", help="Delete what an earlier run left in --out first."),
    seed: int = _EXPERIMENT(
        0,
        help="Seed of the run: the data partition, the malicious devices, the initial model and, with the other "
        "settings, the run id and the local devices' keys (derived with a secret of this host), hence the roles, "
        "the training, the votes and every block. The same command and seed on this machine repeat the run.",
    ),
    threads: int = _NETWORK(1, help="CPU threads per local agent (ONNX inference) and per training job."),
    train_slots: int = _NETWORK(
        0, min=0, help="Local agents: training jobs at once on this host's CPU (0: one per core). See `bfl-agent trainer`."
    ),
    train_device: str = _NETWORK("auto", metavar="CHOICE", help="Where training runs: auto (CUDA when torch sees a GPU), cpu or cuda."),
    join_timeout: float = _NETWORK(300, help="Seconds to wait for devices to connect."),
    quiet: bool = _EXPERIMENT(False, "--quiet", help="No progress bar."),
    metrics_port: int = _METRICS(
        9400, min=0, max=65535, help="Serve the operator's Prometheus metrics on this port (the next free one if taken); local agents use the following free ports (0: off)."
    ),
    metrics_addr: str = _METRICS("127.0.0.1", help="Address the metrics servers bind (0.0.0.0 in a container)."),
    metrics_targets: Path = _METRICS(
        Path("runs/targets"), help="Folder for a Prometheus file_sd file per run (monitoring/prometheus-local.yml reads it)."
    ),
):
    """Run a PoS-BFL experiment and write OUT/summary.json."""
    if resume is not None:
        if config is not None:
            fail("--resume OUT takes the settings of OUT/config.toml; drop --config")
        _refuse_changes(ctx, _RESUME_MAY_SET, f"the run as {resume / 'config.toml'} says")
        if external:
            fail("--resume works with local agents; external devices continue when restarted with their workdir")
    from edge_agent.ml.data import DATASETS
    from edge_agent.protocol.genesis import VOTE_REFERENCES

    from .experiment import Experiment, ExperimentError, RunConfig

    if dataset not in DATASETS:
        fail(f"--dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if vote_ref not in VOTE_REFERENCES:
        fail(f"--vote-ref {vote_ref!r}: choose one of {', '.join(VOTE_REFERENCES)}")
    if train_device not in ("auto", "cpu", "cuda"):
        fail(f"--train-device {train_device!r}: choose one of auto, cpu, cuda")
    if loss_guard < 0:
        fail("--loss-guard must be >= 0 (0 disables it)")
    for ok, what in ((devices >= 3, f"--devices {devices}: need at least 3"),
                     (rounds >= 1, f"--rounds {rounds}: need at least 1"),
                     (local_epochs >= 1, f"--local-epochs {local_epochs}: need at least 1"),
                     (batch_size >= 1, f"--batch-size {batch_size}: need at least 1"),
                     (lr > 0, f"--lr {lr}: must be > 0"),
                     (0 <= vh <= 1, f"--vh {vh}: must be between 0 and 1 (a drop in accuracy, 0.08 = 8 points)")):  # fmt: skip
        if not ok:
            fail(what)
    if data_dir is not None and not data_dir.is_dir():
        fail(f"--data-dir {data_dir}: no such folder (it should hold the four IDX files; see `bfl data fetch {dataset}`)")
    if operator_key is not None and operator_key.exists():
        from edge_agent.protocol.crypto import KeyPair

        if operator_key.is_dir():
            fail(f"--operator-key {operator_key}: is a folder; name the operator's key file (created if missing)")
        try:
            KeyPair.load(operator_key)
        except (ValueError, OSError) as exc:
            fail(f"--operator-key {exc}; it must be the operator's secret key file, as `bfl run` writes it")
    if external and (not broker or broker in LOCAL_BROKERS):
        fail("--external needs --broker URL (the broker the devices are connected to)")
    if broker is not None and broker not in LOCAL_BROKERS:
        from edge_agent.transport import TransportError, parse_broker_url

        try:
            parse_broker_url(broker)
        except TransportError as exc:
            fail(str(exc))
    from .experiment import check_config, choose_malicious, run_folder

    cfg = RunConfig(
        protocol=protocol,
        devices=devices,
        roles=parse_roles(roles),
        malicious=malicious,
        malicious_ids=[d.split("=")[0] for d in malicious_ids.split(",") if d] if malicious_ids else None,
        attacks=dict(d.split("=", 1) for d in (malicious_ids or "").split(",") if "=" in d),
        attack=attack,
        rounds=rounds,
        dataset=dataset,
        data_dir=data_dir,
        model=model,
        partition=partition,
        alpha=alpha,
        samples_per_device=samples_per_device,
        test_per_device=test_per_device,
        local_epochs=local_epochs,
        batch_size=batch_size,
        lr=lr,
        vh=vh,
        vote_ref=vote_ref,
        loss_guard=loss_guard,
        aggregator=aggregator,
        krum_f=krum_f,
        knockout=knockout,
        deadlines_s=parse_deadlines(deadlines),
        broker=broker,
        external=external,
        operator_key=operator_key,
        out=Path("."),  # (the run folder, below: its default name has the run id)
        seed=seed,
        threads=threads,
        train_slots=train_slots,
        train_device=train_device,
        join_timeout=join_timeout,
        metrics_port=metrics_port,
        metrics_addr=metrics_addr,
        metrics_targets=metrics_targets if metrics_port else None,
    )
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from .identity import run_id_for

    try:
        if not external:  # the operator's pick among the local devices, checked before any starts
            choose_malicious(cfg, cfg.device_ids())
        check_config(cfg)  # (the roles against the block limit, the data: before the run's folder is made)
        if resume is None:
            cfg.out = run_folder(out, run_id_for(cfg), overwrite)
    except ExperimentError as exc:
        fail(str(exc))
    if resume is None:
        _write_config(cfg.out / "config.toml", ctx.params,
                      "the settings of this run: `bfl run --config THIS_FILE` repeats it (options given with it override)")
    else:
        cfg.out = resume
    # plain text: no markup, so "[d03,d07]" (the rejected devices) is printed, not taken as a style
    console = Console(stderr=False, soft_wrap=True, markup=False, highlight=False)
    exp = Experiment(cfg, log=lambda m: console.print(m), resume=resume is not None)
    stopped = True
    _terminate_as_interrupt()
    try:
        if resume is not None:
            exp.resume_progress()
        exp.setup()
        devices_info = exp.start_agents()
        exp.publish_genesis(devices_info)
        console.print(
            f"run {exp.run_id} ({cfg.protocol}): {len(devices_info)} devices, roles {cfg.roles}, "
            f"malicious {', '.join(exp.malicious) or 'none'} ({cfg.attack}), {cfg.model} on {cfg.dataset}/{cfg.partition}"
        )
        with Progress(
            TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=quiet, transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task("rounds", total=cfg.rounds, completed=len(exp.results))

            def progress(r):
                bad = [d for d in r.rejected if d in exp.malicious]
                console.print(
                    f"round {r.round:3d}  acc {r.accuracy:6.2f}%  accepted {len(r.accepted):2d}  "
                    f"rejected {len(r.rejected):2d} [{','.join(r.rejected)}]  winner {r.winner}  "
                    f"{r.seconds:6.1f}s (train {r.train_ms_max / 1000:.1f}s)"
                    + ("" if r.agree else "  HEADS DIFFER")
                    + (f"  malicious rejected: {','.join(bad)}" if bad else ""),
                )
                bar.advance(task)

            exp.watch(progress)
        stopped = False
        path = exp.write_summary()
        console.print(f"summary: {path}")
    except (ExperimentError, KeyboardInterrupt) as exc:
        reason = str(exc) if isinstance(exc, ExperimentError) else "interrupted"
        if exp.results and exp.genesis is not None:  # what finished is kept, and said so
            path = exp.write_summary(stopped=reason)
            reason += f"; {len(exp.results)} of {cfg.rounds} rounds are in {path}; continue with: bfl run --resume {cfg.out}"
        fail(reason)
    finally:
        exp.close(stopped)


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("posbfl-testbed")
        except metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        typer.echo(f"bfl (posbfl-testbed) {version}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="Print the version and exit."),
) -> None:
    """PoS-BFL testbed orchestrator."""


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="mnist (needs internet) | fashion-mnist"),
    data_dir: Path = typer.Option(Path("data"), help="Where to put it."),
):
    """Download a dataset (MNIST via torchvision) or check the Fashion-MNIST Debian package."""
    from edge_agent.ml.data import DataMissingError, download_mnist, load_dataset

    try:
        if name == "mnist":
            download_mnist(data_dir)
            ds = load_dataset("mnist", data_dir)
        elif name == "fashion-mnist":
            ds = load_dataset("fashion-mnist", data_dir)
        else:
            fail(f"unknown dataset {name!r}: mnist or fashion-mnist")
            return
    except DataMissingError as exc:
        fail(str(exc))
        return
    typer.echo(f"{name}: {len(ds.train_y)} training and {len(ds.test_y)} test images ready")


def _load_sweep(ctx: typer.Context, param, value: Optional[Path]) -> Optional[Path]:
    """``bfl reproduce --resume OUT``: the stopped sweep's own settings (OUT/reproduce.toml)."""
    if value is None:
        return value
    if not (value / SWEEP_FILE).is_file():
        fail(f"--resume {value}: not the folder of a `bfl reproduce` (it has no {SWEEP_FILE})")
    _apply_config(ctx, value / SWEEP_FILE, f"--resume {value}: its {SWEEP_FILE}")
    return value


SWEEP_FILE = "reproduce.toml"  # a sweep's settings, in its folder: `bfl reproduce --resume` reads them


@app.command()
def reproduce(
    ctx: typer.Context,
    experiment: str = typer.Argument(..., help="table4 | fig6 | fig7 | fig8"),
    profile: str = typer.Option("quick", help="paper (CNN, MNIST, 100 rounds, 3 repeats) | quick (MLP, Fashion-MNIST)."),
    repeats: Optional[int] = typer.Option(None, help="Repeats per setting (default: the profile's)."),
    rounds: Optional[int] = typer.Option(None, help="Override the profile's rounds."),
    dataset: Optional[str] = typer.Option(None, help="Override the profile's dataset."),
    data_dir: Optional[Path] = typer.Option(None),
    samples_per_device: Optional[int] = typer.Option(None, help="Override the profile's training samples per device."),
    local_epochs: Optional[int] = typer.Option(None, help="Override the profile's local epochs."),
    devices: int = typer.Option(
        20, help="Devices per run: the paper's 20, or another number with the paper's role splits and malicious "
        "counts scaled in proportion (12/5/3 -> 24/10/6 for 40)."
    ),
    broker: Optional[str] = typer.Option(
        None, help="mqtt://HOST:PORT of an existing broker, or 'embedded' (default: each run its own local Mosquitto "
        "when installed, as `bfl run` does, else the embedded amqtt)."
    ),
    out: Optional[Path] = typer.Option(
        None, help="Output folder, new or empty (default: a new results/TIME-EXPERIMENT-PROFILE, results/latest pointing at it)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete what an earlier invocation left in --out first."),
    seed: int = typer.Option(0, help="Seed of the first repeat (repeat r uses seed + r); the same seed repeats the runs."),
    resume: Optional[Path] = typer.Option(
        None, is_eager=True, callback=_load_sweep, metavar="OUT",
        help="Continue the stopped sweep in OUT with its own settings: runs whose rows are in OUT/rounds.csv are "
        "skipped, the run that was stopped goes on from its agents' chains, the rest run.",
    ),  # fmt: skip
):
    """Regenerate a table or figure of the paper: runs, CSVs, Markdown table, PNG plots."""
    if resume is not None:
        _refuse_changes(ctx, ("resume", "broker"), f"the sweep as {resume / SWEEP_FILE} says")

    from .experiment import ExperimentError, RunConfig
    from .report import ReportError, build_report
    from .reproduce import EXPERIMENTS, PROFILES, has_rows, plan, run_planned

    if experiment not in EXPERIMENTS:
        fail(f"unknown experiment {experiment!r}: choose one of {', '.join(EXPERIMENTS)}")
    if profile not in PROFILES:
        fail(f"--profile {profile!r}: choose one of {', '.join(PROFILES)}")
    prof = dict(PROFILES[profile])
    n_rep = repeats or prof.pop("repeats")
    prof.pop("repeats", None)
    if n_rep < 1:
        fail("--repeats must be >= 1")
    if rounds:
        prof["rounds"] = rounds
    if dataset:
        prof["dataset"] = dataset
    if samples_per_device:
        prof["samples_per_device"] = samples_per_device
    if local_epochs is not None:
        if local_epochs < 1:
            fail(f"--local-epochs {local_epochs}: need at least 1")
        prof["local_epochs"] = local_epochs
    from .reproduce import PAPER_DEVICES

    try:
        runs = plan(experiment, profile, devices)
    except ValueError as exc:
        fail(str(exc))
    from dataclasses import replace

    from .experiment import check_roles, run_folder

    base = RunConfig(devices=devices, data_dir=data_dir, seed=seed, broker=broker, **prof)
    try:
        for p in runs:  # each setting's roles fit the devices and the block limit, before anything starts
            check_roles(replace(base, roles=p.roles))
        # each invocation its own folder: never appended to an earlier one's CSVs
        if resume is None:
            out = run_folder(out, f"{experiment}-{profile}", overwrite, root=Path("results"))
    except ExperimentError as exc:
        fail(f"{exc}" if devices == PAPER_DEVICES else f"--devices {devices}: {exc}")
    if resume is None:
        _write_config(out / SWEEP_FILE, ctx.params, "this sweep's settings: `bfl reproduce --resume FOLDER` continues it")
    else:
        out = resume
    emb = None
    t0 = time.monotonic()
    failed: list[str] = []
    _terminate_as_interrupt()
    try:
        if broker == "embedded":  # one for all the runs
            from broker import EmbeddedBroker

            emb = EmbeddedBroker()
            base.broker = emb.start()
        scaled = "" if devices == PAPER_DEVICES else f", {devices} devices (the paper's splits scaled)"
        typer.echo(f"{experiment} ({profile}): {len(runs)} settings x {n_rep} repeats, {prof['rounds']} rounds each{scaled} -> {out}")
        for rep in range(n_rep):
            for i, p in enumerate(runs, 1):
                typer.echo(f"[{i}/{len(runs)} repeat {rep}] {p.setting} {p.protocol}, {p.malicious} malicious")
                if resume is not None and has_rows(out, p, rep, prof["rounds"]):
                    typer.echo("  done before")
                    continue
                try:
                    run_planned(base, p, rep, out, log=typer.echo, resume=resume is not None)
                except ExperimentError as exc:  # the sweep goes on; this run's rows stay out of the CSVs
                    typer.echo(f"  FAILED: {exc}")
                    failed.append(f"{p.setting} {p.protocol} repeat {rep}")
        if len(failed) == n_rep * len(runs):
            fail(f"every run failed ({'; '.join(failed[:3])}); see {out / 'runs'}")
        paths = build_report(out, experiment)
    except (ExperimentError, ReportError) as exc:
        fail(str(exc))
        return
    except KeyboardInterrupt:
        fail(f"interrupted; finished runs are in {out}/rounds.csv (bfl report {out}); continue with: bfl reproduce --resume {out}")
        return
    finally:
        if emb is not None:
            emb.stop()
    typer.echo(f"wall time {time.monotonic() - t0:.0f}s")
    for p in paths:
        typer.echo(f"wrote {p}")
    if failed:
        fail(f"{len(failed)} of {n_rep * len(runs)} runs failed and are left out of the report: {'; '.join(failed)} "
             f"(their summary.json in {out / 'runs'} says why)")  # fmt: skip


@app.command()
def report(
    folder: Path = typer.Argument(..., help="A `bfl run` folder (summary.json) or a `bfl reproduce` one (rounds.csv, stakes.csv)."),
    out: Optional[Path] = typer.Option(None, help="Where to write the CSVs, table.md and plots (default: FOLDER)."),
    experiment: Optional[str] = typer.Option(None, help="Only this experiment."),
):
    """The Markdown table, per-round CSVs and the accuracy, stake and vote plots of a run or of
    a reproduction, without rerunning."""
    from .report import ReportError, report_folder

    try:
        paths = report_folder(folder, out, experiment)
    except ReportError as exc:
        fail(str(exc))
        return
    for p in paths:
        typer.echo(f"wrote {p}")


@app.command()
def show(summary: Path = typer.Argument(..., help="A summary.json written by `bfl run`.")):
    """Print the per-round table of a finished run."""
    try:
        s = json.loads(summary.read_text())
        rows = s["rounds"]
    except (OSError, ValueError, KeyError) as exc:
        fail(f"{summary}: not a bfl summary ({exc.__class__.__name__})")
        return
    typer.echo(f"run {s['run_id']}  devices {s['devices']}  roles {s['roles']}  malicious {s['malicious']}")
    for r in rows:
        typer.echo(f"round {r['round']:3d}  acc {r['accuracy']:6.2f}%  accepted {len(r['accepted'])}  rejected {r['rejected']}  winner {r['winner']}")


@app.command()
def verify(
    out: Path = typer.Argument(..., help="The output folder of a finished `bfl run`."),
    operator: Optional[str] = typer.Option(
        None, help="The operator's public key (64 hex) the genesis must be signed with (default: the key it names)."
    ),
):
    """Re-verify a finished run from disk alone: genesis, every agent's chain, G_j from the blobs.

    One line per check (ok / FAIL), then a summary; exit 0 if every check passed, 1 if any
    failed, 2 if OUT is not a run folder."""
    from .verify import NotARun, verify_run

    try:
        checks = verify_run(out, operator)
    except NotARun as exc:
        fail(str(exc))
        return
    n = failed = 0
    for c in checks:
        typer.echo(c.line())
        n += 1
        failed += not c.ok
    if failed:
        typer.echo(f"FAILED: {failed} of {n} checks failed")
        raise typer.Exit(1)
    typer.echo(f"verified: all {n} checks passed")


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
