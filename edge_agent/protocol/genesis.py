"""The genesis block (height 0): who takes part and under which rules.

Published retained by the operator and signed with the operator key. It fixes the admitted
devices with their Ed25519 public keys, the role counts |W|,|V|,|M|, the hyper-parameters of
the paper's Section 5.4 (lr, batch, local epochs ``le``, validator threshold ``vh``, unit
reward ``r``), the knock-out count, the data and model specification, the initial model hash
and the phase deadlines. Malicious devices are not in it: the operator tells them privately.

Every number is an integer (no floats in signed bodies): the learning rate in millionths,
``vh`` in basis points of accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .messages import Drop, Envelope, check_signature, valid_hash, valid_id

VOTE_REFERENCES = ("global", "median", "trained")
# How G_j is computed from the accepted updates: FedAvg (the paper), or a robust rule from
# the survey's Section 2.2.2-2.2.3 for comparison (edge_agent/ml/aggregators.py).
AGGREGATORS = ("fedavg", "median", "trimmed_mean", "multi_krum")

# pFedMe (Dinh, Tran, Nguyen, NeurIPS 2020), the defaults of its MNIST experiments:
# personal learning rate 0.1, learning rate eta 0.005, lambda 15, K = 5 inner steps,
# R = 20 local iterations of batch 20, beta = 1. Integers: rates in millionths.
PFEDME_DEFAULTS = {
    "personal_lr_e6": 100_000,
    "lr_e6": 5_000,
    "lam": 15,
    "k": 5,
    "local_iters": 20,
    "batch_size": 20,
}
CAPABILITIES = ("train", "validate", "mine")


@dataclass(frozen=True)
class Genesis:
    env: Envelope

    @property
    def body(self) -> dict:
        return self.env.body

    @property
    def hash(self) -> str:
        """Block 0's hash: the id of the signed genesis body."""
        return self.env.id

    @property
    def run(self) -> str:
        return self.body["run"]

    @property
    def operator(self) -> str:
        return self.body["operator"]

    @cached_property
    def devices(self) -> dict[str, dict]:
        return self.body["devices"]

    @cached_property
    def device_ids(self) -> list[str]:
        return sorted(self.devices)

    def index_of(self, device: str) -> int:
        return self.device_ids.index(device)

    def pubkey(self, device: str) -> str | None:
        info = self.devices.get(device)
        return info["pubkey"] if info else None

    @property
    def roles(self) -> tuple[int, int, int]:
        w, v, m = self.body["roles"]
        return w, v, m

    @property
    def hp(self) -> dict:
        return self.body["hp"]

    @property
    def data(self) -> dict:
        return self.body["data"]

    @property
    def arch(self) -> str:
        return self.body["model"]["arch"]

    @property
    def init_model(self) -> str:
        return self.body["model"]["init"]

    @property
    def rounds(self) -> int:
        return self.body["rounds"]

    @property
    def deadlines(self) -> dict[str, int]:
        return self.body["deadlines_ms"]

    @property
    def protocol(self) -> str:
        return self.body.get("protocol", "pos-bfl")

    @property
    def lr(self) -> float:
        return self.hp["lr_e6"] / 1e6


def make_genesis_body(
    *,
    run: str,
    operator: str,
    devices: dict[str, dict],
    roles: tuple[int, int, int],
    rounds: int,
    arch: str,
    init_model: str,
    data: dict,
    init_seed: int = 0,
    lr_e6: int = 10_000,
    batch_size: int = 10,
    local_epochs: int = 5,
    vh_bp: int = 800,
    unit_reward: int = 1,
    knockout: int = 3,
    vote_ref: str = "median",
    loss_guard: int = 10,
    aggregator: str = "fedavg",
    krum_f: int = 0,
    trim_ratio_bp: int = 1000,
    deadlines_ms: dict[str, int] | None = None,
    protocol: str = "pos-bfl",
    pfedme: dict | None = None,
    created: str = "",
) -> dict:
    body = {
        "run": run,
        "kind": "genesis",
        "round": 0,
        "sender": "operator",
        "operator": operator,
        "protocol": protocol,
        "created": created,
        "devices": devices,
        "roles": list(roles),
        "rounds": rounds,
        "model": {"arch": arch, "init": init_model, "init_seed": init_seed},
        "data": data,
        "hp": {
            "lr_e6": lr_e6,
            "batch_size": batch_size,
            "local_epochs": local_epochs,
            "vh_bp": vh_bp,
            "unit_reward": unit_reward,
            "knockout": knockout,
            "vote_ref": vote_ref,
            "loss_guard": loss_guard,
            "aggregator": aggregator,
            "krum_f": krum_f,
            "trim_ratio_bp": trim_ratio_bp,
            **({"pfedme": pfedme or dict(PFEDME_DEFAULTS)} if protocol == "pfedme" else {}),
        },
        "deadlines_ms": deadlines_ms
        or {"train": 900_000, "validate": 300_000, "mine": 120_000},
    }
    check_genesis_body(body)
    return body


def check_genesis_body(body: dict) -> None:
    """Structural checks; raises Drop('bad_genesis', why)."""

    def need(cond: bool, why: str) -> None:
        if not cond:
            raise Drop("bad_genesis", why)

    try:
        need(body.get("kind") == "genesis" and body.get("round") == 0, "kind/round")
        need(valid_id(body["run"]), "run id")
        devices = body["devices"]
        need(isinstance(devices, dict) and len(devices) >= 3, "needs >= 3 devices")
        for dev, info in devices.items():
            need(valid_id(dev) and dev != "operator", f"device id {dev!r}")
            need(isinstance(info.get("pubkey"), str) and len(info["pubkey"]) == 64, f"{dev} pubkey")
            caps = info.get("caps", list(CAPABILITIES))
            need(all(c in CAPABILITIES for c in caps), f"{dev} caps")
        w, v, m = body["roles"]
        need(all(isinstance(x, int) and x >= 1 for x in (w, v, m)), "roles must be >= 1")
        need(w + v + m <= len(devices), "roles exceed devices")
        need(isinstance(body["rounds"], int) and body["rounds"] >= 1, "rounds")
        need(valid_hash(body["model"]["init"]), "model.init hash")
        hp = body["hp"]
        for key in ("lr_e6", "batch_size", "local_epochs", "vh_bp", "unit_reward", "knockout", "loss_guard"):
            need(isinstance(hp[key], int) and hp[key] >= 0, f"hp.{key}")
        need(hp["vote_ref"] in VOTE_REFERENCES, "hp.vote_ref")
        need(hp.get("aggregator", "fedavg") in AGGREGATORS, "hp.aggregator")
        need(body.get("protocol", "pos-bfl") in ("pos-bfl", "vanilla", "pfedme"), "protocol")
        if body.get("protocol") == "pfedme":
            need(all(isinstance(v, int) and v > 0 for v in hp["pfedme"].values()), "hp.pfedme")
        for key in ("train", "validate", "mine"):
            need(isinstance(body["deadlines_ms"][key], int) and body["deadlines_ms"][key] > 0, key)
        from .ledger import check_block_bound  # (ledger imports this module)

        check_block_bound(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise Drop("bad_genesis", f"missing or bad field {exc}") from None


def load_genesis(env: Envelope, operator_pubkey: str | None) -> Genesis:
    """Verify a received genesis against the trusted operator key."""
    check_genesis_body(env.body)
    if operator_pubkey is not None and env.body["operator"] != operator_pubkey:
        raise Drop("unknown_operator", "genesis signed by another operator")
    check_signature(env, env.body["operator"])
    return Genesis(env)
