"""`bfl reproduce`: regenerate the paper's Table 4 and Figs. 6-8 on the testbed.

Every run is a real experiment: agents, broker, signatures, training, ONNX validation. Each
run starts its own local Mosquitto, as `bfl run` does (``--broker`` names a shared one, or
``embedded`` for one amqtt broker inside the process for all runs). A run that fails is
reported and left out; the sweep goes on. Each appends its rows to OUT/rounds.csv and
OUT/stakes.csv as soon as it ends, so an interrupted sweep keeps what it measured, and
`bfl report OUT` rebuilds the tables and plots from those files.

Paper, Section 5.4: 20 devices, MNIST with shards, the CNN, batch 10, lr 0.01, 5 local
epochs, vh 0.08, r 1, 100 rounds, 3 repeats.
  Table 4  VFL / pFedMe / PoS-BFL with 3 of 20 malicious, roles 12/5/3 and 8/9/3
  Fig. 6   PoS-BFL accuracy vs round for 3, 4, 6, 8, 10, 12, 14, 16 malicious, roles 12/5/3
  Fig. 7   the same with roles 8/9/3
  Fig. 8   VFL 0/20 vs VFL 3/20 vs PoS-BFL 3/20 (vh 0.08)
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .experiment import Experiment, ExperimentError, RunConfig

ROUND_FIELDS = [
    "experiment", "setting", "protocol", "malicious", "repeat", "round", "accuracy", "accepted",
    "rejected", "malicious_workers", "malicious_accepted", "votes_positive", "votes_negative",
    "seconds", "run_id",
]  # fmt: skip
STAKE_FIELDS = ["experiment", "setting", "protocol", "malicious", "repeat", "round", "device", "stake", "is_malicious", "run_id"]

PROFILES = {
    # the paper's setting (MNIST needs `bfl data fetch mnist`; pass --dataset fashion-mnist offline)
    "paper": dict(model="cnn", dataset="mnist", samples_per_device=None, rounds=100, local_epochs=5, repeats=3),
    # the MLP, fewer samples and rounds: table4 in well under an hour on 2 cores
    "quick": dict(
        model="mlp", dataset="fashion-mnist", samples_per_device=600, rounds=8, local_epochs=5, repeats=1,
        deadlines_s=(120, 60, 60),
    ),
}
MALICIOUS_SWEEP = {"paper": [3, 4, 6, 8, 10, 12, 14, 16], "quick": [3, 6, 10, 14]}
EXPERIMENTS = ("table4", "fig6", "fig7", "fig8")


@dataclass(frozen=True)
class Planned:
    experiment: str
    setting: str
    protocol: str
    roles: tuple[int, int, int]
    malicious: int


def _label(roles: tuple[int, int, int]) -> str:
    return f"{roles[0]}W,{roles[1]}V,{roles[2]}M"


PAPER_DEVICES = 20  # every setting of Section 5.4 splits 20 devices


def scale_roles(roles: tuple[int, int, int], devices: int) -> tuple[int, int, int]:
    """The paper's role split of 20 devices for ``devices`` devices, in the same proportions:
    the devices are apportioned by largest remainder (Hamilton's method), every role keeps at
    least one device (taken from the largest). 12/5/3 -> 24/10/6 for 40, 6/3/1 for 10."""
    if devices < 3:
        raise ValueError(f"--devices {devices}: need at least 3 (a worker, a validator, a miner)")
    total = sum(roles)
    quotas = [r * devices / total for r in roles]
    seats = [int(q) for q in quotas]
    by_remainder = sorted(range(3), key=lambda i: (-(quotas[i] - seats[i]), i))
    for i in by_remainder[: devices - sum(seats)]:
        seats[i] += 1
    for i in range(3):
        if seats[i] == 0:
            seats[i] = 1
            seats[max(range(3), key=lambda k: seats[k])] -= 1
    return seats[0], seats[1], seats[2]


def scale_malicious(k: int, devices: int) -> int:
    """``k`` malicious of the paper's 20, in proportion (half up), at least one if ``k`` > 0."""
    return 0 if k == 0 else max(1, min(devices, (2 * k * devices + PAPER_DEVICES) // (2 * PAPER_DEVICES)))


def plan(experiment: str, profile: str, devices: int = PAPER_DEVICES) -> list[Planned]:
    """The runs of ``experiment``; with ``devices`` other than the paper's 20, its role splits
    and malicious counts scaled in proportion (:func:`scale_roles`, :func:`scale_malicious`)."""
    def roles(r):
        return scale_roles(r, devices)

    def mal(k):
        return scale_malicious(k, devices)

    if experiment == "table4":
        out = []
        for split in ((12, 5, 3), (8, 9, 3)):
            for proto in ("vanilla", "pfedme", "pos-bfl"):
                out.append(Planned("table4", _label(roles(split)), proto, roles(split), mal(3)))
            # clean FedAvg: what PoS-BFL should stay close to
            out.append(Planned("table4", _label(roles(split)), "fedavg-clean", roles(split), 0))
        return out
    if experiment in ("fig6", "fig7"):
        split = roles((12, 5, 3) if experiment == "fig6" else (8, 9, 3))
        ks = list(dict.fromkeys(mal(k) for k in MALICIOUS_SWEEP[profile]))
        return [Planned(experiment, f"mal={k}", "pos-bfl", split, k) for k in ks]
    if experiment == "fig8":
        split, m, n = roles((12, 5, 3)), mal(3), devices
        return [
            Planned("fig8", f"VFL 0/{n}", "fedavg-clean", split, 0),
            Planned("fig8", f"VFL {m}/{n}", "vanilla", split, m),
            Planned("fig8", f"PoS-BFL {m}/{n} vh0.08", "pos-bfl", split, m),
        ]
    raise ValueError(f"unknown experiment {experiment!r}: one of {', '.join(EXPERIMENTS)}")


def _append(path: Path, fields: list[str], rows: list[dict]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def run_dir(out: Path, p: Planned, repeat: int) -> Path:
    return out / "runs" / f"{p.experiment}-{p.setting.replace(' ', '_').replace('/', '-')}-{p.protocol}-r{repeat}"


def has_rows(out: Path, p: Planned, repeat: int, rounds: int) -> bool:
    """Whether OUT/rounds.csv holds every round of this run (a resumed sweep skips it)."""
    try:
        with open(out / "rounds.csv", newline="") as f:
            done = {int(r["round"]) for r in csv.DictReader(f)
                    if (r["experiment"], r["setting"], r["protocol"], r["repeat"]) == (p.experiment, p.setting, p.protocol, str(repeat))}  # fmt: skip
    except (OSError, KeyError, ValueError):
        return False
    return done >= set(range(1, rounds + 1))


def _append_rows(out: Path, p: Planned, rounds: list[dict], stakes: list[dict]) -> None:
    for row in rounds + stakes:
        row["protocol"] = p.protocol
    _append(out / "rounds.csv", ROUND_FIELDS, rounds)
    _append(out / "stakes.csv", STAKE_FIELDS, stakes)


def run_planned(base: RunConfig, p: Planned, repeat: int, out: Path, log=print, resume: bool = False) -> Experiment | None:
    """One run of a sweep, its rows appended to OUT's CSVs when it ends. ``resume`` (``bfl
    reproduce --resume``): a run that had begun goes on from its agents' chains
    (``Experiment.resume_progress``); one that had finished but whose rows are missing gives
    them from its folder; one that had not begun starts afresh."""
    protocol = "vanilla" if p.protocol == "fedavg-clean" else p.protocol
    cfg = replace(
        base,
        protocol=protocol,
        roles=p.roles,
        malicious=p.malicious,
        malicious_ids=None,
        seed=base.seed + repeat,
        out=run_dir(out, p, repeat),
        run_id=None,
    )
    folder = cfg.out
    resuming = resume and (folder / "genesis.json").exists()
    if resuming:
        try:
            finished = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            finished = {}
        if finished.get("stopped", "") is None and len(finished.get("rounds", [])) == cfg.rounds:
            from .report import rows_of_run

            rounds, stakes = rows_of_run(folder)
            ident = {"experiment": p.experiment, "setting": p.setting, "repeat": repeat}
            _append_rows(out, p, [{**r, **ident} for r in rounds], [{**r, **ident} for r in stakes])
            log("  finished before; its rows taken from its folder")
            return None
    elif folder.exists():
        shutil.rmtree(folder)  # a run that had not begun: from the start
    exp = Experiment(cfg, log=lambda m: None, resume=resuming)
    stopped = True
    try:
        if resuming:
            log(f"  resuming after round {exp.resume_progress()}")
        exp.setup()
        exp.publish_genesis(exp.start_agents())
        t0 = time.monotonic()
        try:
            exp.watch(lambda r: log(f"    round {r.round:3d}  acc {r.accuracy:6.2f}%  rejected {','.join(r.rejected) or '-'}"))
        except ExperimentError as exc:
            if exp.results:  # what it finished is kept, in its own folder
                exp.write_summary(stopped=str(exc))
            raise
        stopped = False
        exp.write_summary()
        _append_rows(out, p, *exp.csv_rows(p.experiment, p.setting, repeat))
        log(f"  done in {time.monotonic() - t0:.0f}s")
    finally:
        exp.close(stopped)
    return exp
