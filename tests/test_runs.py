"""A run's identity and its folder (orchestrator/identity.py, experiment.run_folder): what a
repeated run shares with the first, and what keeps two runs from ever mixing."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import pytest

from orchestrator import identity
from orchestrator.experiment import ExperimentError, RunConfig, run_folder


def test_the_run_id_follows_the_settings_that_shape_the_chain_and_nothing_else():
    base = RunConfig(devices=8, roles=(4, 2, 2), rounds=3, seed=7)
    rid = identity.run_id_for(base)
    assert rid.startswith("r") and len(rid) == 17
    # where the output goes and how this host runs the agents do not change a chain
    same = replace(base, out=Path("/elsewhere"), broker="mqtt://h:1", threads=4, train_slots=1, metrics_port=0,
                   join_timeout=5.0, train_device="cpu")  # fmt: skip
    assert identity.run_id_for(same) == rid
    for change in ({"seed": 8}, {"lr": 0.02}, {"malicious": 1}, {"attack": "sign_flip"}, {"rounds": 4},
                   {"roles": (4, 3, 1)}, {"deadlines_s": (900, 300, 60)}, {"dataset": "fashion-mnist"}):  # fmt: skip
        assert identity.run_id_for(replace(base, **change)) != rid, change


def test_keys_are_derived_from_the_host_secret_the_run_and_the_name(tmp_path, monkeypatch):
    monkeypatch.setenv("BFL_HOME", str(tmp_path / "home"))
    k = identity.derived_key("r1", "d00")
    path = tmp_path / "home" / "host-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 64
    assert identity.derived_key("r1", "d00").public_hex == k.public_hex  # the secret is kept
    assert len({identity.derived_key(r, n).public_hex for r in ("r1", "r2") for n in ("d00", "d01", "operator")}) == 6
    # another host (another secret) derives other keys for the same run
    monkeypatch.setenv("BFL_HOME", str(tmp_path / "other"))
    assert identity.derived_key("r1", "d00").public_hex != k.public_hex


def _secret_in(home: str) -> str:
    os.environ["BFL_HOME"] = home
    return identity.host_secret().hex()


def test_runs_that_start_together_on_a_new_host_agree_on_one_secret(tmp_path):
    with Pool(4) as pool:
        secrets = pool.map(_secret_in, [str(tmp_path)] * 8)
    assert len(set(secrets)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["host-secret"]  # no temporary file left


def test_a_damaged_host_secret_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BFL_HOME", str(tmp_path))
    (tmp_path / "host-secret").write_text("not hex\n")
    with pytest.raises(ValueError, match="delete it to make a new one"):
        identity.host_secret()


def test_each_run_gets_its_own_folder_and_latest_points_at_the_newest(tmp_path):
    root = tmp_path / "runs"
    a = run_folder(None, "rabc", root=root)
    b = run_folder(None, "rabc", root=root)  # the same run id again, maybe within the same second
    assert a != b and a.is_dir() and b.is_dir() and a.parent == b.parent == root
    assert "rabc" in a.name and (root / "latest").resolve() == b.resolve()
    (root / "latest").unlink()
    (root / "latest").mkdir()  # a folder an older version wrote there is left alone
    c = run_folder(None, "rdef", root=root)
    assert c.is_dir() and (root / "latest").is_dir() and not (root / "latest").is_symlink()


def test_an_out_folder_with_anything_in_it_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "exp"
    assert run_folder(out, "r1") == out and out.is_dir()  # new: created
    assert run_folder(out, "r1") == out  # empty: fine
    (out / "summary.json").write_text("{}")
    with pytest.raises(ExperimentError, match=r"--out .*not empty.*--overwrite"):
        run_folder(out, "r1")
    assert (out / "summary.json").exists()  # nothing was lost
    assert run_folder(out, "r1", overwrite=True) == out and not any(out.iterdir())
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ExperimentError, match="is a file"):
        run_folder(f, "r1", overwrite=True)


def test_run_help_reads_in_panels_with_every_option_described_and_bfl_has_a_version():
    import subprocess
    import sys
    from importlib import metadata

    import typer

    from orchestrator.cli import app

    env = {**os.environ, "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "--help"], capture_output=True, text=True,
                         env=env, timeout=60).stdout  # fmt: skip
    for panel in ("Experiment", "Data and model", "Attacks", "Defence", "Network and compute", "Metrics"):
        assert f"─ {panel}" in out, panel
    commands = typer.main.get_command(app).commands
    assert sorted(commands) == ["data", "report", "reproduce", "run", "show", "verify"]  # (no helper taken for one)
    run = commands["run"]
    for param in run.params:
        if param.name == "help":
            continue
        assert param.help and param.help.strip(), f"--{param.name} has no help"
        assert f" {param.opts[0]} " in out, f"{param.opts[0]} is cut off or missing"  # whole, at 80 columns
    for choice in ("pos-bfl | vanilla", "cnn (the paper's) | lenet5 | mlp", "mnist | fashion-mnist", "auto (CUDA",
                   "median | global | trained", "fedavg | median"):  # fmt: skip
        assert choice in " ".join(out.replace("│", " ").split()), choice
    version = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--version"], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert version.returncode == 0 and version.stdout.strip() == f"bfl (posbfl-testbed) {metadata.version('posbfl-testbed')}"


def test_reproduce_never_appends_to_an_earlier_invocations_folder(tmp_path):
    import subprocess
    import sys

    earlier = tmp_path / "table4"
    earlier.mkdir()
    (earlier / "rounds.csv").write_text("experiment,setting\ntable4,12W\n")
    for args, needle in ((["--out", str(earlier)], "not empty"), (["--local-epochs", "0"], "--local-epochs")):
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "reproduce", "table4", *args],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert (earlier / "rounds.csv").read_text() == "experiment,setting\ntable4,12W\n"
    assert not (tmp_path / "results").exists()  # nothing started, no folder made


def test_reproduce_scales_the_papers_settings_to_other_device_counts():
    from orchestrator.reproduce import PAPER_DEVICES, plan, scale_malicious, scale_roles

    for split in ((12, 5, 3), (8, 9, 3)):
        assert scale_roles(split, PAPER_DEVICES) == split
        for n in range(3, 201):
            w, v, m = scale_roles(split, n)
            assert min(w, v, m) >= 1 and w + v + m == n, (split, n)
    assert scale_roles((12, 5, 3), 40) == (24, 10, 6) and scale_roles((8, 9, 3), 10) == (4, 5, 1)
    assert [scale_malicious(k, 40) for k in (0, 3, 6, 10, 14)] == [0, 6, 12, 20, 28]
    assert scale_malicious(3, 3) == 1  # never none of a paper's malicious devices
    assert [(p.roles, p.malicious) for p in plan("table4", "quick", 20)][:4] == [((12, 5, 3), 3)] * 3 + [((12, 5, 3), 0)]
    assert [p.setting for p in plan("fig8", "quick", 40)] == ["VFL 0/40", "VFL 6/40", "PoS-BFL 6/40 vh0.08"]
    assert len({p.malicious for p in plan("fig6", "quick", 4)}) == len(plan("fig6", "quick", 4))  # no repeated setting


def test_reproduce_refuses_device_counts_it_cannot_run_before_anything_starts(tmp_path):
    import subprocess
    import sys

    for devices, needle in (("2", "need at least 3"), ("200", "over the 1047552-byte limit")):
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "reproduce", "table4", "--devices", devices],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and f"--devices {devices}: " in lines[0] and needle in lines[0], proc.stderr
    assert not (tmp_path / "results").exists()


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.experiment import run_folder

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: run_folder(None, "rsame", root=tmp_path), range(8)))
    assert len(set(folders)) == 8 and all(f.is_dir() and not any(f.iterdir()) for f in folders)
    assert (tmp_path / "latest").resolve() in {f.resolve() for f in folders}
