"""End to end: `bfl run` starts real agent processes that train (PyTorch), validate (ONNX
Runtime), mine and agree on a chain over a real broker -- the orchestrator's embedded amqtt
broker and a real Mosquitto."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edge_agent.ml import blobs as bl
from edge_agent.protocol import ledger
from edge_agent.protocol.genesis import Genesis
from edge_agent.store import ChainStore, block_blobs

SMALL = [
    "--devices", "8", "--roles", "4,2,2", "--malicious", "2", "--rounds", "5",
    "--model", "mlp", "--dataset", "fashion-mnist", "--samples-per-device", "300",
    "--deadlines", "120,60,60", "--quiet",
]  # fmt: skip


def bfl(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def load_chain(out: Path, device: str, run_id: str):
    store = ChainStore(out / "agents" / device / "runs", run_id)
    genesis = Genesis(store.load_genesis())
    return genesis, store.load_blocks()


def assert_every_malicious_worker_rejected(summary: dict) -> None:
    """In every round, each malicious worker's update is rejected (and not accepted); at
    least one round had a malicious worker."""
    mal = set(summary["malicious"])
    seen = 0
    for r in summary["rounds"]:
        bad = mal & set(r["workers"])
        seen += len(bad)
        assert bad <= set(r["rejected"]) and not bad & set(r["accepted"]), r
    assert seen >= 1, "no malicious worker in any round"


def check_run(out: Path, proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    malicious = set(summary["malicious"])
    honest = sorted(set(summary["heads"]) - malicious)
    assert len(malicious) == 2 and len(summary["rounds"]) == 5

    # every honest agent ends with the same head, and it is on disk in its chain
    heads = {summary["heads"][d] for d in honest}
    assert len(heads) == 1 and None not in heads
    genesis, chain = load_chain(out, honest[0], summary["run_id"])
    assert chain[-1].id == heads.pop()
    for d in honest[1:]:
        assert [b.id for b in load_chain(out, d, summary["run_id"])[1]] == [b.id for b in chain]

    # malicious updates are voted out every round their device was a worker ...
    # (roles follow block hashes, not --seed: P(no malicious worker in 5 rounds) = (15/70)^5 = 0.05 %;
    # with 4 rounds, 0.2 % per run, and the suite runs this twice)
    assert_every_malicious_worker_rejected(summary)
    assert all(set(r["accepted"]) <= set(honest) for r in summary["rounds"])

    # ... and not averaged: G_j is the FedAvg of exactly the accepted updates' blobs.
    # bfl run moved the agents' stores into one (one file per hash): everything the chain
    # names is there, and no agent keeps a copy
    store = bl.BlobStore(out / "blobs")
    assert not list(out.glob("agents/*/blobs"))
    named = {genesis.init_model}.union(*(block_blobs(b.body) for b in chain))
    assert all(store.has(h) for h in named)
    assert len(list((out / "blobs").glob("*/*.safetensors"))) < 2 * len(named)
    for blk in chain:
        inputs = ledger.aggregation_inputs(blk.body)
        accepted_models = {w["body"]["model"] for w in blk.body["wtxs"] if w["body"]["sender"] in blk.body["accepted"]}
        assert {h for h, _ in inputs} == accepted_models
        g = bl.fedavg([(store.get_params(h, genesis.arch), n) for h, n in inputs])
        assert bl.blob_hash(bl.encode(g)) == blk.body["global_model"]

    # stakes recomputed from the chain match the agents' own and the summary's
    state = ledger.replay(genesis, chain)
    assert summary["stakes"] == {d: state.stake(d) for d in genesis.device_ids}
    for d in honest:
        assert summary["reported_stakes"][d] == state.stake(d)
    assert max(state.stake(d) for d in honest) > max(state.stake(d) for d in malicious)
    assert all(r["accuracy"] > 10 for r in summary["rounds"][1:])
    return summary


def _essence(summary: dict) -> tuple:
    rounds = [(r["round"], r["workers"], r["accepted"], r["rejected"], r["winner"], r["block_hash"], r["accuracy"])
              for r in summary["rounds"]]  # fmt: skip
    return summary["run_id"], summary["malicious"], summary["heads"], summary["stakes"], rounds


def test_the_same_command_and_seed_repeat_the_run(tmp_path, mosquitto_broker):
    """A run, then the config.toml it wrote given back to `bfl run --config`, on one broker
    (the first run's retained messages are still there): the same run id, roles, votes,
    accuracies and blocks, and chain files equal byte for byte; the same config with another
    --seed on the command line gives another run."""
    args = ["--devices", "6", "--roles", "3,2,1", "--malicious", "1", "--rounds", "3", "--model", "mlp",
            "--dataset", "fashion-mnist", "--samples-per-device", "200", "--deadlines", "120,60,60", "--quiet",
            "--broker", mosquitto_broker, "--seed", "4"]  # fmt: skip
    config = str(tmp_path / "a" / "config.toml")
    summaries = []
    for name, how in (("a", args), ("b", ["--config", config]), ("c", ["--config", config, "--seed", "5"])):
        proc = bfl("run", *how, "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    a, b, c = summaries
    written = [tomllib.loads((tmp_path / x / "config.toml").read_text()) for x in "ab"]
    assert written[0] == written[1] and "out" not in written[0] and written[0]["seed"] == 4
    assert _essence(a) == _essence(b)
    assert len({r["block_hash"] for r in a["rounds"]}) == 3 and a["stopped"] is None
    for dev in a["heads"]:
        files = [tmp_path / x / "agents" / dev / "runs" / a["run_id"] for x in ("a", "b")]
        assert sorted(p.name for p in files[0].iterdir()) == sorted(p.name for p in files[1].iterdir())
        assert (files[0] / "chain.jsonl").read_bytes() == (files[1] / "chain.jsonl").read_bytes()
    assert c["run_id"] != a["run_id"] and c["heads"] != a["heads"]

    # `bfl report` on a plain run folder, written elsewhere: the rows replay its chain
    proc = bfl("report", str(tmp_path / "a"), "--out", str(tmp_path / "report"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "report" / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["accuracy"]) for r in rows] == [r["accuracy"] for r in a["rounds"]]
    assert [int(r["rejected"]) for r in rows] == [len(r["rejected"]) for r in a["rounds"]]
    with open(tmp_path / "report" / "stakes.csv") as f:
        last = {r["device"]: int(r["stake"]) for r in csv.DictReader(f) if r["round"] == "3"}
    assert last == a["stakes"]
    from matplotlib.image import imread

    for name in ("accuracy", "stakes", "votes"):
        img = imread(tmp_path / "report" / f"{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.05, name  # a drawn figure
    assert not (tmp_path / "a" / "table.md").exists()  # the run folder is left as it was

    # the same command stopped by Ctrl-C after round 1, then `bfl run --resume`: it goes on
    # from the agents' chains on disk and ends with run a's chain, which verifies as one
    d = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", *args, "--out", str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith("round   1") and len([x for x in printed if x.startswith("round   1")]) == 1:
            proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 2, "".join(printed)
    stopped = json.loads((d / "summary.json").read_text())
    assert stopped["stopped"] == "interrupted" and stopped["continue_with"] == f"bfl run --resume {d}"
    assert 1 <= len(stopped["rounds"]) < 3 and f"continue with: bfl run --resume {d}" in "".join(printed)
    proc = bfl("run", "--resume", str(d))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    resumed = json.loads((d / "summary.json").read_text())
    assert _essence(resumed) == _essence(a) and resumed["stopped"] is None
    assert resumed["resumed_at"] == [len(stopped["rounds"])] and resumed["started_utc"] == stopped["started_utc"]
    for dev in a["heads"]:
        files = [tmp_path / x / "agents" / dev / "runs" / a["run_id"] / "chain.jsonl" for x in ("a", "d")]
        assert files[0].read_bytes() == files[1].read_bytes()
    proc = bfl("verify", str(d), timeout=120)
    assert proc.returncode == 0 and "verified: all" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_small_run_over_real_broker(broker, tmp_path, request):
    out = tmp_path / "out"
    args = [*SMALL, "--out", str(out), "--seed", "1"]
    if broker == "mosquitto":
        args += ["--broker", request.getfixturevalue("mosquitto_broker")]
    else:
        args += ["--broker", "embedded"]
    proc = bfl("run", *args)
    summary = check_run(out, proc)
    assert summary["config"]["broker"] == args[-1]
    # the per-round lines were printed, each naming the devices whose updates were rejected
    assert proc.stdout.count("round ") >= 3 and "winner" in proc.stdout
    for r in summary["rounds"]:
        assert f"rejected {len(r['rejected']):2d} [{','.join(r['rejected'])}]" in proc.stdout


def test_validator_only_devices_run_without_torch(tmp_path, mosquitto_broker):
    """Two agents cannot import torch at all; they validate and mine (ONNX Runtime) while
    the others train. A torch import on their code path would crash them."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked for this validator-only device')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    from edge_agent.protocol.crypto import KeyPair

    out = tmp_path / "out"
    operator = KeyPair.generate()
    operator.save(tmp_path / "operator.key")
    procs = []
    try:
        for dev in ("v0", "v1"):
            KeyPair.generate().save(tmp_path / f"{dev}.key")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edge_agent.cli", "run", "--id", dev, "--key", str(tmp_path / f"{dev}.key"),
                     "--broker", mosquitto_broker, "--operator-key", operator.public_hex,
                     "--workdir", str(tmp_path / dev), "--caps", "validate,mine", "--exit-after-run"],
                    env=env, stdout=open(tmp_path / f"{dev}.log", "wb"), stderr=subprocess.STDOUT,
                )  # fmt: skip
            )
        torch_ok = []
        for dev in ("w0", "w1", "w2", "w3"):
            KeyPair.generate().save(tmp_path / f"{dev}.key")
            torch_ok.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edge_agent.cli", "run", "--id", dev, "--key", str(tmp_path / f"{dev}.key"),
                     "--broker", mosquitto_broker, "--operator-key", operator.public_hex,
                     "--workdir", str(tmp_path / dev), "--exit-after-run"],
                    stdout=open(tmp_path / f"{dev}.log", "wb"), stderr=subprocess.STDOUT,
                )  # fmt: skip
            )
        procs += torch_ok
        proc = bfl(
            "run", "--devices", "6", "--roles", "3,2,1", "--rounds", "2", "--model", "mlp",
            "--dataset", "fashion-mnist", "--samples-per-device", "200", "--partition", "iid",
            "--broker", mosquitto_broker, "--external", "--operator-key", str(tmp_path / "operator.key"),
            "--out", str(out), "--quiet", "--deadlines", "120,60,60",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert len(set(summary["heads"].values())) == 1
        for r in summary["rounds"]:
            assert not {"v0", "v1"} & set(r["workers"])  # never asked to train
        for dev in ("v0", "v1"):
            store = ChainStore(tmp_path / dev / "runs", summary["run_id"])
            assert len(store.load_blocks()) == 2
            log = (tmp_path / f"{dev}.log").read_text()
            assert "Traceback" not in log, log[-2000:]
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_unreachable_broker_is_a_one_line_error(tmp_path):
    from broker import free_port

    proc = bfl("run", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--dataset", "fashion-mnist", "--out", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the MQTT broker" in lines[0], proc.stderr


def test_missing_data_is_a_one_line_error(tmp_path):
    proc = bfl("run", "--dataset", "mnist", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bfl data fetch mnist" in lines[0], proc.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--roles", "12,5"], "--roles"),
        (["--devices", "5", "--roles", "4,2,2"], "needs 8 devices"),
        (["--devices", "200", "--roles", "120,50,30"], "over the 1047552-byte limit"),
        (["--model", "resnet"], "--model"),
        (["--vote-ref", "magic"], "--vote-ref"),
        (["--broker", "http://x"], "mqtt://"),
    ],
)
def test_bad_options_are_one_line_errors(args, needle, tmp_path):
    proc = bfl("run", "--dataset", "fashion-mnist", "--out", str(tmp_path), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def _junk_key(tmp: Path) -> str:
    (tmp / "junk.key").write_bytes(bytes(range(256)))
    return str(tmp / "junk.key")


def _stopped_run(tmp: Path) -> str:
    (tmp / "old").mkdir()
    (tmp / "old" / "config.toml").write_text('rounds = 3\ndataset = "fashion-mnist"\n')
    return str(tmp / "old")


def _earlier_run(tmp: Path) -> str:
    (tmp / "old").mkdir()
    (tmp / "old" / "summary.json").write_text("{}")
    return str(tmp / "old")


@pytest.mark.parametrize(
    "make_args,needle",
    [
        (lambda t: ["--out", str(t / "file")], "--out"),
        (lambda t: ["--out", _earlier_run(t)], "not empty"),
        (lambda t: ["--operator-key", str(t)], "--operator-key"),
        (lambda t: ["--operator-key", _junk_key(t)], "not an Ed25519 key file"),
        (lambda t: ["--devices", "8", "--roles", "4,2,2", "--malicious", "9"], "--malicious 9"),
        (lambda t: ["--devices", "8", "--roles", "4,2,2", "--malicious-ids", "d03,d11"], "d11"),
        (lambda t: ["--data-dir", str(t / "missing")], "--data-dir"),
        (lambda t: ["--lr", "0"], "--lr"),
        (lambda t: ["--vh", "2"], "--vh"),
        (lambda t: ["--local-epochs", "0"], "--local-epochs"),
        (lambda t: ["--devices", "200", "--roles", "120,50,30"], "1047552-byte limit"),
        (lambda t: ["--samples-per-device", "100000"], "--samples-per-device 100000"),
        (lambda t: ["--model", "resnet"], "--model 'resnet'"),
        (lambda t: ["--resume", str(t / "missing")], "no such run folder"),
        (lambda t: ["--resume", _earlier_run(t)], "has no config.toml"),
        (lambda t: ["--resume", _stopped_run(t), "--rounds", "5"], "cannot change"),
    ],
)
def test_mistakes_are_one_line_errors_before_anything_starts(make_args, needle, tmp_path):
    """Each names the option; nothing was started (no broker, no agents, no run folder)."""
    (tmp_path / "file").write_text("x")
    args = make_args(tmp_path)
    proc = bfl("run", "--dataset", "fashion-mnist", "--out", str(tmp_path / "run"), *args, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("**/agents"))
    assert (tmp_path / "file").read_text() == "x"  # and nothing was lost


def test_killed_agent_restarts_from_disk_and_catches_up(tmp_path, mosquitto_broker):
    """SIGKILL one agent after it appended a block, start it again on the same work
    directory: it reloads its chain, pulls the blocks it missed from a peer (verifying them
    like any block), and ends on the same head as everybody else."""
    import signal
    import time

    from edge_agent.protocol.crypto import KeyPair

    operator = KeyPair.generate()
    operator.save(tmp_path / "operator.key")
    devices = [f"e{i}" for i in range(6)]
    rounds = 6  # enough that the victim is back (interpreter start-up) well before the last round

    def start(dev):
        key = tmp_path / f"{dev}.key"
        if not key.exists():
            KeyPair.generate().save(key)
        return subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--id", dev, "--key", str(key),
             "--broker", mosquitto_broker, "--operator-key", operator.public_hex,
             "--workdir", str(tmp_path / dev), "--exit-after-run"],
            stdout=open(tmp_path / f"{dev}.log", "ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    agents = {d: start(d) for d in devices}
    out = tmp_path / "out"
    orch = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "--devices", "6", "--roles", "3,2,1", "--rounds", str(rounds),
         "--model", "mlp", "--dataset", "fashion-mnist", "--samples-per-device", "200", "--partition", "iid",
         "--local-epochs", "2", "--broker", mosquitto_broker, "--external", "--operator-key",
         str(tmp_path / "operator.key"), "--out", str(out), "--quiet", "--deadlines", "20,10,10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    victim = "e5"
    try:
        end = time.monotonic() + 300
        chain_files = lambda: list((tmp_path / victim / "runs").glob("*/chain.jsonl"))  # noqa: E731
        while not (chain_files() and chain_files()[0].read_text().count("\n") >= 1):
            assert time.monotonic() < end and orch.poll() is None, "run ended before the first block"
            time.sleep(0.2)
        agents[victim].send_signal(signal.SIGKILL)
        agents[victim].wait()
        height_at_kill = chain_files()[0].read_text().count("\n")
        time.sleep(1)
        agents[victim] = start(victim)
        stdout, _ = orch.communicate(timeout=600)
        assert orch.returncode == 0, stdout[-3000:]
        for d, p in agents.items():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{d} still running after the run; its log ends:\n" + (tmp_path / f"{d}.log").read_text()[-4000:]) from None
    finally:
        for p in [*agents.values(), orch]:
            if p.poll() is None:
                p.kill()
    summary = json.loads((out / "summary.json").read_text())
    run_id = summary["run_id"]
    chains = {d: [b.id for b in ChainStore(tmp_path / d / "runs", run_id).load_blocks()] for d in devices}
    assert len(chains["e0"]) == rounds and height_at_kill < rounds - 2
    assert all(c == chains["e0"] for c in chains.values()), {d: len(c) for d, c in chains.items()}
    log = (tmp_path / f"{victim}.log").read_text()
    assert log.count("joined run") == 2  # joined, was killed, rejoined from its chain on disk


@pytest.mark.parametrize("given", ["public", "another", "shared"])
def test_an_operator_key_the_devices_reject_is_reported_within_seconds(given, tmp_path, mosquitto_broker):
    """Three real devices trust the operator's public key. `bfl run --external` given that
    public key file as --operator-key (the same 64-hex format as a secret one), or another
    operator's secret key, would publish a genesis they all drop; it says so in one line, a
    few seconds after they announced themselves, instead of waiting. On a broker shared with
    another operator's devices ("shared": one device of its own is there too) it waits for
    its own devices as long as --join-timeout says, and then names the others as well."""
    import time

    from edge_agent.protocol.crypto import KeyPair

    operator = KeyPair.generate()
    (tmp_path / "operator.pub").write_text(operator.public_hex + "\n")
    KeyPair.generate().save(tmp_path / "other.key")
    trust = {"x0": operator.public_hex, "x1": operator.public_hex, "x2": operator.public_hex}
    if given == "shared":
        trust["y0"] = KeyPair.load(tmp_path / "other.key").public_hex
    agents = []
    for dev, operator_pub in trust.items():
        KeyPair.generate().save(tmp_path / f"{dev}.key")
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--id", dev, "--key", str(tmp_path / f"{dev}.key"),
             "--broker", mosquitto_broker, "--operator-key", operator_pub, "--workdir", str(tmp_path / dev)],
            stdout=open(tmp_path / f"{dev}.log", "ab"), stderr=subprocess.STDOUT,
        ))  # fmt: skip
    try:
        key = tmp_path / ("operator.pub" if given == "public" else "other.key")
        t0 = time.monotonic()
        proc = bfl("run", "--external", "--broker", mosquitto_broker, "--devices", str(len(trust)), "--roles", "1,1,1",
                   "--model", "mlp", "--dataset", "fashion-mnist", "--operator-key", str(key), "--out", str(tmp_path / "run"),
                   "--quiet", "--metrics-port", "0", "--join-timeout", "20", timeout=120)  # fmt: skip
        took = time.monotonic() - t0
    finally:
        for a in agents:
            a.terminate()
            a.wait(20)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    if given == "shared":
        assert len(lines) == 1 and lines[0].startswith("error: only 1 of 4 devices announced themselves within 20s"), proc.stderr
        assert f"besides, --operator-key {key}: devices x0, x1, x2 trust the operator key {operator.public_hex[:16]}" in lines[0]
        assert took >= 20
        return
    assert len(lines) == 1 and lines[0].startswith(f"error: --operator-key {key}: "), proc.stderr
    assert "x0, x1, x2 trust the operator key " + operator.public_hex[:16] in lines[0]
    if given == "public":
        assert "holds the operator's public key" in lines[0] and "secret key file" in lines[0]
    else:
        assert f"restart them with --operator-key {KeyPair.load(key).public_hex}" in lines[0]
    assert took < 45, took  # agents start in a few seconds; then OTHERS_GRACE_S
    assert not (tmp_path / "run" / "genesis.json").exists()  # nothing was published


def test_reproduce_runs_a_figure_with_overrides(tmp_path, mosquitto_broker):
    """`bfl reproduce fig8` with every override (devices, rounds, samples, epochs): three real
    runs of 6 devices with the paper's 12/5/3 split and 3 of 20 malicious scaled, their rows
    in rounds.csv, the table and the plots."""
    out = tmp_path / "fig8"
    proc = bfl("reproduce", "fig8", "--devices", "6", "--rounds", "2", "--samples-per-device", "100", "--local-epochs", "1",
               "--broker", mosquitto_broker, "--out", str(out), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({(r["setting"], r["protocol"], r["malicious"]) for r in rows}) == [
        ("PoS-BFL 1/6 vh0.08", "pos-bfl", "1"), ("VFL 0/6", "fedavg-clean", "0"), ("VFL 1/6", "vanilla", "1")]
    assert len(rows) == 6 and all(0 < float(r["accuracy"]) <= 100 for r in rows)
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/summary.json"))]
    assert [(s["devices"], s["roles"], len(s["rounds"])) for s in summaries] == [(6, [4, 1, 1], 2)] * 3
    assert "VFL 1/6" in (out / "table.md").read_text() and (out / "accuracy.png").stat().st_size > 10_000

    # the same sweep stopped by Ctrl-C in its second run, then `bfl reproduce --resume`: the
    # first run is skipped, the second goes on from its agents' chains, the third runs; the
    # CSVs end as the uninterrupted sweep's
    again = tmp_path / "again"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "reproduce", "fig8", "--devices", "6", "--rounds", "2",
                             "--samples-per-device", "100", "--local-epochs", "1", "--broker", mosquitto_broker, "--out", str(again)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    printed, firsts = [], 0
    for line in proc.stdout:
        printed.append(line)
        firsts += line.strip().startswith("round   1")
        if firsts == 2 and line.strip().startswith("round   1"):
            proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 2 and f"continue with: bfl reproduce --resume {again}" in printed[-1], "".join(printed)
    proc = bfl("reproduce", "--resume", str(again), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # (the second run resumed after its round 1; had its round 2 ended before the signal, it is done)
    assert (proc.stdout.count("done before"), "resuming after round 1" in proc.stdout) in ((1, True), (2, False)), proc.stdout

    def rows(path):
        with open(path) as f:
            return sorted(tuple(v for k, v in r.items() if k != "seconds") for r in csv.DictReader(f))

    assert rows(again / "rounds.csv") == rows(out / "rounds.csv") and rows(again / "stakes.csv") == rows(out / "stakes.csv")
