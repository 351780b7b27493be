"""`bfl verify OUT` on a real run (agents over the embedded broker, real training, MLP on
Fashion-MNIST): it passes on the run as written, and a single changed byte anywhere the
chain depends on -- a block in one agent's chain file, the genesis, a model blob -- is a
FAIL line naming what broke (exit 1), never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_e2e import bfl

RUN = [
    "--devices", "6", "--roles", "3,2,1", "--malicious", "2", "--rounds", "3",
    "--model", "mlp", "--dataset", "fashion-mnist", "--samples-per-device", "300",
    "--deadlines", "120,60,60", "--metrics-port", "0", "--quiet", "--seed", "1",
]  # fmt: skip
# Two malicious devices: roles follow from the run's keys, which are new each run, and one
# malicious device of six is no worker in any of 3 rounds one run in eight (a voted-down
# update is what test_a_voted_down_update_may_be_absent_but_not_corrupt needs); two, one in 125.
DEVICE = "d02"  # whose chain file is altered


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "out"
    proc = bfl("run", *RUN, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def chain_path(out: Path, dev: str = DEVICE) -> Path:
    return out / "agents" / dev / "runs" / summary_of(out)["run_id"] / "chain.jsonl"


def blocks(out: Path) -> list[dict]:
    return [json.loads(line) for line in chain_path(out).read_bytes().splitlines()]


def blob(out: Path, h: str) -> Path:
    return out / "blobs" / h[:2] / f"{h}.safetensors"


def set_byte(path: Path, pos: int, new: int | None = None) -> None:
    """Change exactly the byte at ``pos``: to ``new``, else a digit to the next digit and any
    other byte to a different one of the same class (hex stays hex)."""
    data = bytearray(path.read_bytes())
    old = data[pos]
    if new is None:
        c = chr(old)
        new = ord(str((int(c) + 1) % 10)) if c.isdigit() else ord("b" if c == "a" else "a") if c in "abcdef" else old ^ 1
    assert new != old
    data[pos] = new
    path.write_bytes(bytes(data))


def verify(out: Path, *args: str):
    return bfl("verify", str(out), *args, timeout=120)


def test_a_good_run_verifies(run_out):
    s = summary_of(run_out)
    before = {p: p.stat().st_mtime_ns for p in run_out.rglob("*")}
    proc = verify(run_out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith("ok   ") for line in lines[:-1]), proc.stdout
    assert lines[-1] == f"verified: all {len(lines) - 1} checks passed"
    text = proc.stdout
    operator = json.loads((run_out / "genesis.json").read_text())["body"]["operator"]
    assert f"ok   genesis signature (operator {operator[:12]}...) and consistency: run {s['run_id']}, 6 devices" in text
    assert "ok   G_0 = init_params(mlp, seed 1) = model.init " in text
    for j in range(1, 4):
        assert f"ok   block {j} (miner " in text
        assert f"ok   block {j}: G_{j} " in text and "recomputed from the blobs" in text
    for dev in sorted(s["heads"]):
        assert f"ok   {dev} chain: genesis copy, 3 blocks, links and signatures; height 3, head {s['heads'][dev][:12]}" in text
    assert f"ok   chains agree: all 6 devices at height 3, head {s['heads']['d00'][:12]}" in text
    assert f"malicious {', '.join(s['malicious'])} included" in text
    assert "ok   blobs: the " in text and "ok   summary.json agrees with the chain" in text
    # read-only: nothing under OUT was written
    assert {p: p.stat().st_mtime_ns for p in run_out.rglob("*")} == before


# ---- one changed byte each -------------------------------------------------------------


def _line(out: Path, j: int) -> tuple[Path, int, int]:
    """(chain file, start, end) of block j's line in it (end: its newline)."""
    path = chain_path(out)
    data = path.read_bytes()
    start = 0
    for _ in range(j - 1):
        start = data.index(b"\n", start) + 1
    return path, start, data.index(b"\n", start)


def _in_block(out: Path, j: int, needle: bytes, skip: int = 0) -> tuple[Path, int]:
    """(chain file, offset just after ``needle`` in block j's line, plus ``skip``)."""
    path, start, end = _line(out, j)
    return path, path.read_bytes().index(needle, start, end) + len(needle) + skip


def reward_digit(out: Path) -> list[str]:
    path, at = _in_block(out, 2, b'"rewards":{"')
    at = path.read_bytes().index(b":", at) + 1  # the first digit of the first reward
    set_byte(path, at)
    return [f"FAIL block 2 ({DEVICE}'s chain): the signature of its miner ", "rewards differ from the recomputed value"]


def vote_positive(out: Path) -> list[str]:
    """The first vote of block 1 (in the first validator tx with votes): "positive" -> "Positive"."""
    validator = next(v for v in blocks(out)[0]["body"]["vtxs"] if v["body"]["votes"])["body"]["sender"]
    path, at = _in_block(out, 1, b'"positive"', skip=-len(b'positive"'))
    set_byte(path, at, ord("P"))
    return [f"FAIL block 1 ({DEVICE}'s chain): ", f"the vtx of {validator} in it is not signed by {validator}"]


def block_signature(out: Path) -> list[str]:
    """A hex digit of block 3's own signature (the envelope's last member)."""
    miner = blocks(out)[2]["body"]["sender"]
    path, _, end = _line(out, 3)
    set_byte(path, end - 10)
    return [f"FAIL block 3 ({DEVICE}'s chain): the signature of its miner {miner} does not verify", f"FAIL {DEVICE} chain: "]


def block_prev(out: Path) -> list[str]:
    path, at = _in_block(out, 2, b'"height":2,"kind":"block","prev":"', skip=3)
    set_byte(path, at)
    return [f"FAIL block 2 ({DEVICE}'s chain): prev ", "is not the id of block 1", "FAIL chains disagree"]


def chain_not_json(out: Path) -> list[str]:
    path, at = _in_block(out, 2, b'{"body":', skip=-len(b'{"body":'))
    set_byte(path, at, ord("["))
    return [f"FAIL block 2 ({DEVICE}'s chain): line 2 of chain.jsonl is not a signed block envelope"]


def genesis_byte(out: Path) -> list[str]:
    path = out / "genesis.json"
    set_byte(path, path.read_bytes().index(b'"rounds":') + len(b'"rounds":'))
    return ["FAIL genesis.json: the operator's signature does not verify"]


def genesis_signature(out: Path) -> list[str]:
    path = out / "genesis.json"
    set_byte(path, path.read_bytes().rindex(b'"sig":"') + len(b'"sig":"') + 10)
    return ["FAIL genesis.json: the operator's signature does not verify"]


def agent_genesis(out: Path) -> list[str]:
    path = chain_path(out).with_name("genesis.json")
    set_byte(path, path.read_bytes().index(b'"pubkey":"') + len(b'"pubkey":"') + 3)
    return [f"FAIL {DEVICE} chain: its genesis.json is not the run's genesis"]


def accepted_update_blob(out: Path) -> list[str]:
    j, b = next((j, b["body"]) for j, b in enumerate(blocks(out), 1) if b["body"]["accepted"])
    worker = b["accepted"][0]
    h = next(w["body"]["model"] for w in b["wtxs"] if w["body"]["sender"] == worker)
    set_byte(blob(out, h), 4000)
    return [
        f"FAIL block {j}: G_{j} cannot be recomputed: the update of {worker} (blob {h[:12]}...) is corrupt",
        f"FAIL blob {h[:12]}... (update of {worker} in block {j}) is corrupt",
    ]


def final_model_blob(out: Path) -> list[str]:
    h = blocks(out)[-1]["body"]["global_model"]
    set_byte(blob(out, h), 100)  # in the safetensors header
    return [f"FAIL blob {h[:12]}... (G_3) is corrupt: blobs/{h[:2]}/{h}.safetensors hashes to "]


def initial_model_blob(out: Path) -> list[str]:
    h = json.loads((out / "genesis.json").read_text())["body"]["model"]["init"]
    set_byte(blob(out, h), 20000)
    return [f"FAIL blob {h[:12]}... (G_0) is corrupt"]


CORRUPTIONS = [
    reward_digit, vote_positive, block_signature, block_prev, chain_not_json,
    genesis_byte, genesis_signature, agent_genesis,
    accepted_update_blob, final_model_blob, initial_model_blob,
]  # fmt: skip


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[f.__name__ for f in CORRUPTIONS])
def test_one_changed_byte_fails(run_out, tmp_path, corrupt):
    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    originals = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    expected = corrupt(out)
    changed = [p for p, data in originals.items() if p.read_bytes() != data]
    assert len(changed) == 1 and sum(a != b for a, b in zip(originals[changed[0]], changed[0].read_bytes())) == 1
    proc = verify(out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr == ""
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]
    for want in expected:
        assert any(want in line for line in fails), f"{want!r} not in:\n" + "\n".join(fails)
    assert proc.stdout.splitlines()[-1] == f"FAILED: {len(fails)} of {len(proc.stdout.splitlines()) - 1} checks failed"


def test_a_wrong_global_model_signed_by_its_miner_fails(run_out, tmp_path):
    """A miner that signs a block whose G_j is not the aggregate of its accepted updates:
    every signature and the outcome verify; only recomputing G_j from the blobs catches it."""
    from edge_agent.protocol.canonical import parse
    from edge_agent.protocol.crypto import KeyPair
    from edge_agent.protocol.messages import from_json, sign

    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    envs = [from_json(parse(line)) for line in chain_path(out).read_bytes().splitlines()]
    j = len(envs)
    last = envs[-1]
    assert last.body["accepted"]
    body = {**last.body, "global_model": envs[-2].body["global_model"]}  # G_{j-1}: "nothing learnt"
    forged = sign(KeyPair.load(out / "keys" / f"{last.sender}.key"), body)
    for dev in summary_of(out)["heads"]:
        path = chain_path(out, dev)
        path.write_bytes(b"".join(e.payload() + b"\n" for e in [*envs[:-1], forged]))
    proc = verify(out)
    assert proc.returncode == 1, proc.stdout
    assert f"ok   block {j} (miner {last.sender}" in proc.stdout
    assert f"FAIL block {j}: G_{j} {body['global_model'][:12]}... is not the recomputed fedavg of " in proc.stdout


def test_a_missing_blob_fails(run_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    j, b = next((j, b["body"]) for j, b in enumerate(blocks(out), 1) if b["body"]["accepted"])
    worker = b["accepted"][-1]
    h = next(w["body"]["model"] for w in b["wtxs"] if w["body"]["sender"] == worker)
    blob(out, h).unlink()
    proc = verify(out)
    assert proc.returncode == 1, proc.stdout
    assert f"FAIL block {j}: G_{j} cannot be recomputed: the update of {worker} (blob {h[:12]}...) is missing from blobs/" in proc.stdout
    assert f"FAIL blob {h[:12]}... (update of {worker} in block {j}) is missing from blobs/" in proc.stdout


def test_pinned_operator_key(run_out):
    operator = json.loads((run_out / "genesis.json").read_text())["body"]["operator"]
    assert verify(run_out, "--operator", operator).returncode == 0
    proc = verify(run_out, "--operator", "ab" * 32)
    assert proc.returncode == 1 and "FAIL genesis.json: signed by another operator than --operator" in proc.stdout


@pytest.mark.parametrize("what", ["missing", "file", "empty"])
def test_not_a_run_folder_is_a_one_line_error(tmp_path, what):
    target = tmp_path / "out"
    if what == "file":
        target.write_text("{}\n")
    elif what == "empty":
        target.mkdir()
    proc = verify(target)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert str(target) in proc.stderr


def test_verify_is_torch_free():
    """An auditor needs no PyTorch: the verifier imports numpy, safetensors and PyNaCl only."""
    import subprocess
    import sys

    code = "import orchestrator.cli, orchestrator.verify, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_voted_down_update_may_be_absent_but_not_corrupt(run_out, tmp_path):
    """A rejected update's model is not needed to recompute anything (its worker may never
    have published it -- that is why it was voted down): absent is fine, a wrong copy is not."""
    out = tmp_path / "out"
    shutil.copytree(run_out, out)
    rejected = [(j, w["body"]) for j, b in enumerate(blocks(out), 1) for w in b["body"]["wtxs"]
                if w["body"]["sender"] in b["body"]["rejected"]]  # fmt: skip
    assert rejected, "the run has a malicious worker whose update was voted down"
    j, tx = rejected[0]
    h = tx["model"]
    accepted = {w["body"]["model"] for b in blocks(out) for w in b["body"]["wtxs"] if w["body"]["sender"] in b["body"]["accepted"]}
    assert h not in accepted  # (noise on every parameter: never another update's bytes)
    blob(out, h).unlink()
    proc = verify(out)
    assert proc.returncode == 0, proc.stdout
    assert "1 update(s) voted down and never published or fetched are not in blobs/" in proc.stdout
    blob(out, h).parent.mkdir(parents=True, exist_ok=True)
    blob(out, h).write_bytes(b"not that model")
    proc = verify(out)
    assert proc.returncode == 1 and f"FAIL blob {h[:12]}... (update of {tx['sender']} in block {j}) is corrupt" in proc.stdout
