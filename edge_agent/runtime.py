"""Carries out the Node's heavy actions: training, evaluation, aggregation.

Training is a job for the host's trainer service (``compute.py``), which runs it under the
host's compute budget in a process that holds torch; this process never imports torch.
Evaluation uses ONNX Runtime and aggregation numpy only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .compute import SharedCache, Trainer
from .ml import blobs as bl
from .ml.data import DeviceData, device_data, release_datasets
from .protocol import node as nd
from .protocol.canonical import canonical_bytes
from .protocol.crypto import sha256_hex
from .protocol.genesis import Genesis

log = logging.getLogger("bfl.runtime")


def attack_kwargs(attack: dict) -> dict:
    """Command bodies carry integers; the attack functions take floats."""
    kw = {}
    for key, name in (("variance_milli", "variance"), ("scale_milli", "scale")):
        if isinstance(attack.get(key), int):
            kw[name] = attack[key] / 1000
    return kw


class Runtime:
    def __init__(
        self,
        genesis: Genesis,
        me: str,
        store: bl.BlobStore,
        data_dir: str | Path | None,
        threads: int = 1,
        trainer: Trainer | None = None,
        shared: SharedCache | None = None,
    ):
        self.genesis = genesis
        self.trainer = trainer or Trainer()
        self.shared = shared
        self.me = me
        self.store = store
        self.data_dir = data_dir
        self.threads = threads
        self._data: DeviceData | None = None
        self._evaluator = None
        self._scores: dict[str, tuple[int, int]] = {}
        self._personal: tuple[int, dict] | None = None  # pFedMe: (round, theta)
        self.timings: dict[str, int] = {}
        self.jobs: list[tuple[int, int]] = []  # (start, end) ms since the epoch of each training job
        self.attack: dict | None = None  # the operator's fault injection (set by the agent)

    @property
    def arch(self) -> str:
        return self.genesis.arch

    @property
    def data(self) -> DeviceData:
        if self._data is None:
            self._data = device_data(self.genesis.data, self.genesis.index_of(self.me), self.data_dir)
            release_datasets()
        return self._data

    @property
    def evaluator(self):
        if self._evaluator is None:
            from .ml.onnx_eval import Evaluator

            self._evaluator = Evaluator(self.arch, threads=self.threads)
        return self._evaluator

    def ensure_initial_model(self) -> None:
        """G_0 is derived from (arch, seed); check it is the genesis' initial model."""
        model = self.genesis.body["model"]
        if self.store.has(model["init"]):
            return
        from .ml.arch import init_params

        data = bl.encode(init_params(model["arch"], model["init_seed"]))
        if bl.blob_hash(data) != model["init"]:
            raise RuntimeError("the initial model of the genesis differs from init_params(arch, init_seed)")
        self.store.put(data)

    def _params(self, h: str) -> dict:
        params = self.store.get_params(h, self.arch)
        if params is None:
            raise RuntimeError(f"blob {h[:12]} not in the store")
        return params

    def _score(self, h: str) -> tuple[int, int]:
        """(accuracy bp, cross-entropy milli-nats) of model ``h`` on this device's test split.

        A model with NaN/inf weights is scored for what it predicts (about chance) with the
        maximal loss; one that does not decode at all scores (0, max)."""
        if h not in self._scores:
            try:
                data = self.store.get(h)
                if data is None:
                    raise RuntimeError(f"blob {h[:12]} not in the store")
                params = bl.decode(data, self.arch, finite=False)
            except ValueError as exc:  # undecodable, wrong shapes or non-finite: worthless
                log.warning("%s: model %s unusable: %s", self.me, h[:12], exc)
                self._scores[h] = (0, 10**9)
            else:
                self._scores[h] = self.evaluator.scores(params, self.data.test_x, self.data.test_y)
            if len(self._scores) > 256:
                self._scores.pop(next(iter(self._scores)))
        return self._scores[h]

    def _accuracy(self, h: str) -> int:
        return self._score(h)[0]

    # -- actions --

    def run(self, action):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if isinstance(action, nd.Train):
                return self.train(action)
            if isinstance(action, nd.Evaluate):
                return self.evaluate(action)
            if isinstance(action, nd.Score):  # cached for the validator's Evaluate; no event
                self._score(action.model)
                return None
            if isinstance(action, nd.Aggregate):
                return self.aggregate(action)
            if isinstance(action, nd.EvaluateGlobal):
                return self.evaluate_global(action)
            raise TypeError(action)
        except Exception as exc:  # reported to the node, never fatal
            log.exception("%s: %s failed", self.me, type(action).__name__)
            key = str(getattr(action, "round", getattr(action, "key", getattr(action, "height", ""))))
            return nd.TaskFailed(type(action).__name__.lower(), key, f"{type(exc).__name__}: {exc}")
        finally:
            name = "evaluate" if isinstance(action, nd.Score) else type(action).__name__.lower()
            self.timings[name] = self.timings.get(name, 0) + int((time.perf_counter() - t0) * 1000)
            cpu = f"{name}_cpu"  # this thread's CPU time: the task's cost, whatever else runs
            self.timings[cpu] = self.timings.get(cpu, 0) + int((time.thread_time() - c0) * 1000)

    def take_timings(self) -> dict[str, int]:
        """Milliseconds spent per task kind since the last call (for the round report)."""
        out, self.timings = {f"{k}_ms": v for k, v in self.timings.items()}, {}
        if self.jobs:  # the last job's slot interval (the budget check of tests/test_compute.py)
            out["train_start_ms"], out["train_end_ms"] = self.jobs[-1]
            self.jobs = []
        return out

    def _job(self, job: dict, base: dict, flip_labels: bool) -> tuple[dict, dict | None]:
        """Run a training job on the host's trainer service; its wait for the host's compute
        budget and its compute time are kept apart (``train_wait_ms``, ``train_compute_ms``)."""
        y = self.data.train_y
        if flip_labels:
            from .ml.attacks import flip_labels as flip

            y = flip(y)
        hp = self.genesis.hp
        job = {"arch": self.arch, "batch_size": hp["batch_size"], "lr": self.genesis.lr, **job}
        res = self.trainer.run(job, bl.encode(base), self.data.train_x, y)
        for k, v in (("train_wait", res.wait_ms), ("train_compute", res.compute_ms)):
            self.timings[k] = self.timings.get(k, 0) + v
        self.jobs.append((int(res.start * 1000), int(res.end * 1000)))
        personal = bl.decode(res.personal, self.arch, finite=False) if res.personal is not None else None
        return bl.decode(res.params, self.arch, finite=False), personal

    def _train_params(self, base: dict, epochs: int, seed: int, flip_labels: bool = False) -> dict:
        params, _ = self._job({"op": "train", "epochs": epochs, "seed": seed}, base, flip_labels)
        return params

    def train(self, a: nd.Train) -> nd.TrainingDone:
        from .ml.attacks import ATTACKS, apply_attack

        name = (self.attack or {}).get("name")
        base = self._params(a.base_model)
        if name == "lazy":  # skips training altogether
            params = dict(base)
        elif self.genesis.protocol == "pfedme":
            params = self._train_pfedme(base, a, flip_labels=name == "label_flip")
        else:
            params = self._train_params(base, self.genesis.hp["local_epochs"], a.seed, flip_labels=name == "label_flip")
        if name in ATTACKS:
            params = apply_attack(name, params, a.seed, base=base, **attack_kwargs(self.attack))
        if name:
            log.info("%s: round %d: malicious behaviour %s", self.me, a.round, name)
        return nd.TrainingDone(a.round, bl.encode(params))

    def _train_pfedme(self, base: dict, a: nd.Train, flip_labels: bool) -> dict:
        p = self.genesis.hp["pfedme"]
        job = {
            "op": "pfedme",
            "seed": a.seed,
            "batch_size": p["batch_size"],
            "pfedme": {
                "local_iters": p["local_iters"],
                "k": p["k"],
                "personal_lr": p["personal_lr_e6"] / 1e6,
                "lr": p["lr_e6"] / 1e6,
                "lam": p["lam"],
            },
        }
        w, theta = self._job(job, base, flip_labels)
        self._personal = (a.round, theta)
        return w

    def evaluate_global(self, a: nd.EvaluateGlobal) -> nd.GlobalEvaluated:
        """Accuracy reported after block ``height``: of G_j, or for pFedMe of the device's
        personalized model of that round (what pFedMe reports)."""
        if self._personal is not None and self._personal[0] == a.height:
            acc, _ = self.evaluator.scores(self._personal[1], self.data.test_x, self.data.test_y)
            return nd.GlobalEvaluated(a.height, a.model_hash, acc)
        return nd.GlobalEvaluated(a.height, a.model_hash, self._accuracy(a.model_hash))

    def evaluate(self, a: nd.Evaluate) -> nd.EvaluationDone:
        global_bp = self._accuracy(a.base_model)
        trained_bp = None
        if a.want_trained:
            ref = self._train_params(self._params(a.base_model), 1, a.seed)
            trained_bp = self.evaluator.accuracy_bp(ref, self.data.test_x, self.data.test_y)
        scores = {h: self._score(h) for h in a.models}
        return nd.EvaluationDone(
            a.round, global_bp, trained_bp, {h: s[0] for h, s in scores.items()}, {h: s[1] for h, s in scores.items()}
        )

    def aggregate(self, a: nd.Aggregate) -> nd.AggregateDone:
        """G_j from the accepted updates by the genesis' rule (:func:`aggregate_for_genesis`,
        also what ``bfl verify`` recomputes); with no usable update, G_j = G_{j-1}."""
        from .ml.aggregators import aggregate_for_genesis

        missing = tuple(h for h, _ in a.inputs if not self.store.has(h))
        if missing:
            return nd.AggregateDone(a.key, None, missing)
        def load(h: str) -> bytes:
            data = self.store.get(h)
            if data is None:
                raise RuntimeError(f"blob {h[:12]} not in the store")
            return data

        def compute() -> bytes | None:
            updates = [(lambda h=h: load(h), n) for h, n in a.inputs]  # read one at a time
            g = aggregate_for_genesis(self.genesis.hp, self.arch, updates, warn=lambda m: log.warning("%s: %s", self.me, m))
            return None if g is None else bl.encode(g)

        if self.shared is None:
            data = compute()
            return nd.AggregateDone(a.key, a.base if data is None else self.store.put(data))
        # co-located agents: one of them aggregates these inputs, the others take its result
        key = sha256_hex(canonical_bytes({"arch": self.arch, "hp": self.genesis.hp, "inputs": [list(i) for i in a.inputs]}))
        g_hash = self.shared.once(key, compute)
        if g_hash is None:
            return nd.AggregateDone(a.key, a.base)
        data = self.shared.blobs.get(g_hash)
        if data is None:
            raise RuntimeError(f"shared aggregate {g_hash[:12]} unreadable")
        return nd.AggregateDone(a.key, self.store.put(data))
