"""An in-memory network for the sans-io Node: the round logic without a broker.

The "model" is a vector; training moves it towards a target, the Gaussian attack adds
N(0, 1) noise, accuracy falls with the distance to the target. Messages, signatures,
blobs (real safetensors bytes), FedAvg and the ledger are the real ones.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edge_agent.protocol import node as nd
from edge_agent.protocol.crypto import KeyPair, sha256_hex
from edge_agent.protocol.genesis import Genesis, make_genesis_body
from edge_agent.protocol.messages import decode, sign, topic

DIM = 16
TARGET = np.linspace(-1, 1, DIM).astype(np.float32)


def blob_of(vec: np.ndarray) -> bytes:
    return st_save({"w": np.ascontiguousarray(vec, dtype=np.float32)})


def vec_of(data: bytes) -> np.ndarray:
    return st_load(data)["w"]


def accuracy_bp(vec: np.ndarray) -> int:
    return max(0, 9000 - int(2000 * float(np.linalg.norm(vec - TARGET))))


def make_run(n=8, roles=(4, 2, 2), rounds=3, run="r1", protocol="pos-bfl", **hp):
    # deterministic keys: the genesis hash, and so every role draw, is the same on every run
    op = KeyPair.from_seed_hex(sha256_hex(f"{run}|operator".encode()))
    keys = {f"d{i:02d}": KeyPair.from_seed_hex(sha256_hex(f"{run}|d{i:02d}".encode())) for i in range(n)}
    init = blob_of(np.zeros(DIM, np.float32))
    body = make_genesis_body(
        run=run,
        operator=op.public_hex,
        devices={d: {"pubkey": k.public_hex} for d, k in keys.items()},
        roles=roles,
        rounds=rounds,
        arch="mlp",
        init_model=sha256_hex(init),
        data={"dataset": "sim", "samples_per_device": 100, "n_devices": n},
        deadlines_ms={"train": 10_000, "validate": 10_000, "mine": 10_000},
        protocol=protocol,
        **hp,
    )
    genesis = Genesis(sign(op, body))
    return genesis, keys, init


class SimNet:
    """``rng``: deliver queued events in random order (else FIFO). ``byzantine``: device ->
    fn(net, dev, Publish) -> [(destinations or None for all, Publish)], what that device
    really sends instead of each honest publication (tests/test_byzantine.py)."""

    def __init__(self, n=8, roles=(4, 2, 2), rounds=3, malicious=(), silent=(), protocol="pos-bfl", rng=None,
                 byzantine=None, **hp):  # fmt: skip
        self.genesis, self.keys, init = make_run(n, roles, rounds, protocol=protocol, **hp)
        self.blobs = {sha256_hex(init): init}
        self.nodes = {
            d: nd.Node(d, k, self.genesis, have_blob=self.blobs.__contains__) for d, k in self.keys.items()
        }
        self.malicious = set(malicious)  # the shell's fault injection: noisy training
        self.silent = set(silent)
        self.now = 0.0
        self.queue: deque = deque()  # (device, event)
        self.published: list[nd.Publish] = []
        self.committed: dict[str, list] = {d: [] for d in self.nodes}
        self.deleted: dict[str, set] = {d: set() for d in self.nodes}
        self.signed: dict[str, list] = {d: [] for d in self.nodes}
        self.reports: list = []
        self.tamper = None  # optional fn(Publish) -> Publish | None
        self.retained: dict[str, bytes] = {}
        self.lose = None  # optional fn(dest, Publish) -> True to lose that delivery
        self.rng = rng
        self.byzantine = dict(byzantine or {})

    def start(self):
        for d, node in self.nodes.items():
            if d not in self.silent:
                self._do(d, node.start(self.now))

    def _do(self, dev, actions):
        for a in actions:
            if isinstance(a, nd.Publish):
                if self.tamper:
                    a = self.tamper(dev, a)
                    if a is None:
                        continue
                if any(f"/{k}/" in a.topic for k in ("wtx", "vtx", "block")):
                    self.signed[dev].append(decode(a.payload))  # the agent's log of what it signed
                sends = self.byzantine[dev](self, dev, a) if dev in self.byzantine else [(None, a)]
                for dests, pub in sends:
                    self.send(pub, dests)
            elif isinstance(a, nd.StoreBlob):
                self.blobs[a.hash] = a.data
            elif isinstance(a, nd.Train):
                base = vec_of(self.blobs[a.base_model])
                rng = np.random.default_rng(a.seed)
                new = base + 0.5 * (TARGET - base) + rng.normal(0, 0.01, DIM).astype(np.float32)
                if dev in self.malicious:
                    new = new + rng.normal(0, 1.0, DIM).astype(np.float32)
                self.queue.append((dev, nd.TrainingDone(a.round, blob_of(new))))
            elif isinstance(a, nd.Evaluate):
                res = {h: accuracy_bp(vec_of(self.blobs[h])) for h in a.models}
                loss = {h: int(1000 * float(np.sum((vec_of(self.blobs[h]) - TARGET) ** 2))) for h in a.models}
                g = accuracy_bp(vec_of(self.blobs[a.base_model]))
                self.queue.append((dev, nd.EvaluationDone(a.round, g, g, res, loss)))
            elif isinstance(a, nd.Aggregate):
                missing = tuple(h for h, _ in a.inputs if h not in self.blobs)
                if missing:
                    self.queue.append((dev, nd.AggregateDone(a.key, None, missing)))
                    continue
                total = sum(n for _, n in a.inputs)
                acc = sum(vec_of(self.blobs[h]).astype(np.float64) * n for h, n in a.inputs) / total
                data = blob_of(acc.astype(np.float32))
                h = sha256_hex(data)
                self.blobs[h] = data
                self.queue.append((dev, nd.AggregateDone(a.key, h)))
            elif isinstance(a, nd.CommitBlock):
                self.committed[dev].append(a.block)
            elif isinstance(a, nd.Rollback):
                del self.committed[dev][a.height :]
            elif isinstance(a, nd.DeleteBlob):
                self.deleted[dev].add(a.hash)  # one store shared by all nodes: keep the bytes
            elif isinstance(a, nd.EvaluateGlobal):
                self.queue.append((dev, nd.GlobalEvaluated(a.height, a.model_hash, accuracy_bp(vec_of(self.blobs[a.model_hash])))))
            elif isinstance(a, nd.BlobRequestAnswer):
                data = self.blobs[a.hash]
                self._do(dev, [nd.Publish(topic(self.genesis.run, "blob", dev, a.hash), data)])
            elif isinstance(a, (nd.Finished, nd.Score)):
                pass  # (Score: the shell's cache; Evaluate computes the same numbers)

    def send(self, pub: nd.Publish, dests=None):
        """Deliver ``pub`` through the broker: to every live device, or only to ``dests``."""
        self.published.append(pub)
        if pub.retain:
            self.retained[pub.topic] = pub.sent
        for other in self.nodes if dests is None else dests:
            if other not in self.silent and not (self.lose and self.lose(other, pub)):
                self.queue.append((other, nd.Received(pub.topic, pub.sent)))

    def restart(self, dev):
        """The device's process died and starts again: a new Node from what it persisted (its
        chain and the messages it signed), then the broker's retained messages."""
        old = self.nodes[dev]
        self.nodes[dev] = nd.Node(dev, old.key, self.genesis, list(self.committed[dev]),
                                  have_blob=self.blobs.__contains__, signed=self.signed[dev], resumed=True)  # fmt: skip
        self.queue = type(self.queue)((d, ev) for d, ev in self.queue if d != dev)  # in flight to the dead process
        self.revive(dev)

    def revive(self, dev):
        """A device that was down comes up: it starts from its chain and gets retained state."""
        self.silent.discard(dev)
        self._do(dev, self.nodes[dev].start(self.now))
        for t, payload in self.retained.items():
            self.queue.append((dev, nd.Received(t, payload)))

    def deliver(self, dev, event):
        self._do(dev, self.nodes[dev].handle(event, self.now))

    def run(self, max_steps=100_000, advance_clock=1.0, until=None):
        """Deliver events until every live node finished (or ``until()``); advance the clock when idle."""
        steps = 0
        while steps < max_steps:
            steps += 1
            if until is not None and until():
                return
            if self.queue:
                if self.rng is not None:
                    self.queue.rotate(-int(self.rng.integers(len(self.queue))))
                dev, ev = self.queue.popleft()
                if dev in self.silent:
                    continue
                if isinstance(ev, nd.GlobalEvaluated):
                    self.reports.append((dev, ev))
                self.deliver(dev, ev)
                continue
            # (a byzantine device need not finish: e.g. once slashed, its pulls go unanswered)
            live = [n for d, n in self.nodes.items() if d not in self.silent and d not in self.byzantine]
            if all(n.finished for n in live):
                return
            self.now += advance_clock
            for d, n in self.nodes.items():
                if d not in self.silent:
                    self._do(d, n.tick(self.now))
        raise AssertionError("simulation did not finish")
