"""Property tests of the sans-io Node under random and hostile event sequences (hypothesis).

A victim ``Node`` of a small real run (tests/simnet.py: real keys, signatures and safetensors
blobs) is driven with a sequence of steps drawn by hypothesis, mixing

- the messages of two real runs on the same genesis (an honest one, and one where a worker and
  a miner equivocate, so it holds evidence and second candidates): delivered in order, replayed
  out of order, duplicated, on the wrong topic;
- mutated copies of them (a field replaced by an arbitrary JSON value, deleted, added, a list
  item duplicated), left with the old signature or re-signed with the sender's REAL key after
  the mutation, the outer envelope only or every envelope on the path (a block's worker tx
  too): a valid signature on a hostile body;
- arbitrary bytes and JSON on every topic kind the node subscribes to, junk blobs;
- well-formed but semantically wrong messages signed by real keys: worker / validator txs and
  blocks of any device for any round and parent, votes for workers or txs that do not exist,
  sync requests with odd fields, chain answers with junk blocks and txs, evidence with junk
  items or with a real equivocation pair at any round, head claims of any height;
- the shell's events: honest answers to the node's Train / Evaluate / Aggregate /
  EvaluateGlobal actions in any order and late, and wrong ones (other rounds and keys, failed
  tasks, made-up hashes);
- clock ticks (``now`` only grows).

After every step the node's invariants are checked (``Harness.check``, ``check_publish``):
nothing escaped ``Node.handle`` / ``Node.tick``; junk is counted as a drop of a known reason;
the state is the replay of the chain, which is what the shell persisted; blobs are the ones
stored and not deleted; buffers, candidates and evidence stay within bounds that do not grow
with what is received; every message the node publishes is one its peers accept, and it
never signs two different messages for one slot (an honest device must never look like an
equivocator). ``test_no_second_message_for_a_slot_after_a_reorganisation`` aims the same
checks at reorganisations; ``test_liveness_*`` runs a whole SimNet with hostile noise
injected in random delivery orders: every node still ends with the one same chain.

Steps are plain tuples, so a failing sequence can be pasted into ``run_steps`` as a
deterministic reproducer; the ``test_bug_*`` functions at the end are such reproducers,
minimised, of what the properties found in the core.
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from edge_agent.protocol import ledger
from edge_agent.protocol import node as nd
from edge_agent.protocol.canonical import CanonicalError, canonical_bytes
from edge_agent.protocol.crypto import sha256_hex
from edge_agent.protocol.messages import (
    DROP_REASONS,
    MAX_JSON_BYTES,
    RUN_KINDS,
    Drop,
    Envelope,
    check_signature,
    decode,
    parse_topic,
    sign,
    topic,
    valid_id,
)

from simnet import DIM, TARGET, SimNet, accuracy_bp, blob_of, make_run, vec_of

N, ROLES, ROUNDS = 8, (3, 2, 2), 3
#: the topic kinds a node handles (messages.parse_topic); the others it must drop
SUBSCRIBED = ("wtx", "vtx", "block", "blob", "sync", "chain", "head", "evidence")
OTHER_KINDS = ("report", "ack", "cmd", "genesis", "hello")
SLOT_KINDS = ("wtx", "vtx", "block")


# ---- the corpus: two real runs on one genesis ---------------------------------------------


def _halves(net):
    devs = sorted(net.nodes)
    return devs[::2], devs[1::2]


def _equivocating(net, dev, pub):
    """A second, different signed worker tx (with its own blob) or candidate block for the
    slot of each one ``dev`` publishes; half of the devices get each."""
    kind = pub.topic.split("/")[3]
    a, b = _halves(net)
    if kind == "wtx":
        env = decode(pub.payload)
        other = blob_of(np.full(DIM, 0.25, np.float32) + np.float32(env.round))
        h = sha256_hex(other)
        second = sign(net.keys[dev], dict(env.body, model=h))
        return [(None, nd.Publish(topic(net.genesis.run, "blob", dev, h), other)), (a, pub),
                (b, nd.Publish(pub.topic, second.payload()))]  # fmt: skip
    if kind == "block":
        node = net.nodes[dev]
        empty = ledger.build_block(net.genesis, node.state, dev, [], [], node.state.global_model)
        return [(a, pub), (b, nd.Publish(pub.topic, sign(net.keys[dev], empty).payload()))]
    return [(None, pub)]


class Corpus:
    """Everything the steps draw from: the genesis, the keys, the messages of the two runs,
    the honest chain's states and pools of hashes and strings worth trying."""

    def __init__(self):
        honest = SimNet(n=N, roles=ROLES, rounds=ROUNDS)
        honest.start()
        honest.run()
        genesis = honest.genesis
        r1 = ledger.roles_for(genesis, ledger.genesis_state(genesis))
        self.byzantine = (r1.workers[0], r1.miners[0])
        hostile = SimNet(n=N, roles=ROLES, rounds=ROUNDS, rng=np.random.default_rng(7),
                         byzantine={d: _equivocating for d in self.byzantine})  # fmt: skip
        hostile.start()
        hostile.run(max_steps=400_000)
        assert hostile.genesis.hash == genesis.hash
        self.genesis, self.keys, self.run = genesis, honest.keys, genesis.run
        self.devices = sorted(self.keys)
        self.init = genesis.init_model
        self.init_blob = honest.blobs[self.init]
        #: the honest run's messages in publication order (the "next" steps deliver them)
        self.honest = [(p.topic, p.payload) for p in honest.published]
        seen, self.messages = set(), []
        for p in honest.published + hostile.published:
            if (p.topic, p.payload) not in seen:
                seen.add((p.topic, p.payload))
                self.messages.append((p.topic, p.payload))
        self.json_messages = [m for m in self.messages if "/blob/" not in m[0]]
        self.blobs = {p.topic.split("/")[-1]: p.payload for p in honest.published + hostile.published
                      if "/blob/" in p.topic}  # fmt: skip
        chain = self.chain = honest.nodes[self.devices[0]].chain
        self.states = [ledger.genesis_state(genesis)]
        for blk in chain:
            self.states.append(ledger.process_block(genesis, self.states[-1], blk)[0])
        # the honest txs of each round (to build other candidates from)
        self.txs = {r: ([], []) for r in range(1, ROUNDS + 1)}
        envs = [decode(payload) for _, payload in self.json_messages]
        for blk in chain:
            for raw in blk.body["wtxs"]:
                self.txs[blk.body["height"]][0].append(ledger.from_json(raw))
            for raw in blk.body["vtxs"]:
                self.txs[blk.body["height"]][1].append(ledger.from_json(raw))
        self.evidence_items = [e.body["item"] for e in envs if e.kind == "evidence"]
        self.blocks = [e for e in envs if e.kind == "block"]
        self.wtxs = [e for e in envs if e.kind == "wtx"]
        self.heads = sorted({genesis.hash} | {b.id for b in self.blocks})
        ids = {e.id for e in envs if e.kind in SLOT_KINDS}
        self.hashes = sorted({self.init, "00" * 32, "ff" * 32} | set(self.blobs) | ids | set(self.heads)
                             | {s.global_model for s in self.states})  # fmt: skip
        self.strings = sorted(set(self.devices) | {self.run, "r2", "ghost", "", "operator", ".."}
                              | set(RUN_KINDS) | {"genesis", "content"})  # fmt: skip
        self.fields = sorted(ledger.BLOCK_FIELDS | ledger.WTX_FIELDS | ledger.VTX_FIELDS | ledger.VOTE_FIELDS
                             | {"body", "sig", "item", "a", "b", "to", "blocks", "txs", "target", "from_height",
                                "blobs", "wtx_of", "vtx_of", "tx_ids", "nonce", "head", "content"})  # fmt: skip


C = Corpus()


def pick(seq, i):
    return seq[i % len(seq)] if seq else None


class View:
    """What the steps draw on: the messages they may replay or mutate, and the keys they may
    sign with (``may_sign(device, kind)``). ``me``: the victim (a sync target, a chain
    answer's addressee)."""

    def __init__(self, may_sign, me=None, messages=()):
        self.may_sign, self.me = may_sign, me
        self.messages: list[tuple[str, bytes]] = []
        self.json_messages: list[tuple[str, bytes]] = []
        self.blocks: list[Envelope] = []
        self.wtxs: list[Envelope] = []
        self.evidence_items: list[dict] = []
        self.add(messages)

    def add(self, messages):
        for t, payload in messages:
            self.messages.append((t, payload))
            if "/blob/" in t:
                continue
            try:
                env = decode(payload)
            except Drop:
                continue
            self.json_messages.append((t, payload))
            if env.kind == "block":
                self.blocks.append(env)
            elif env.kind == "wtx":
                self.wtxs.append(env)
            elif env.kind == "evidence" and isinstance(env.body.get("item"), dict):
                self.evidence_items.append(env.body["item"])
        return self


def from_other_life(victim: str, msg) -> bool:
    """A corpus message the victim's key signed in the corpus run (where its node may have
    signed other messages than the victim signs now), or that carries a slot message it signed
    there (evidence against it, a tx in a chain answer). Fed to the victim it would be a
    compromise of its key: the victim is then right to see itself equivocate."""
    t, payload = msg
    if parse_topic(t).device == victim:
        return True
    if "/blob/" in t:
        return False
    body = decode(payload).body
    inner = []
    if body["kind"] == "evidence":
        inner = [body["item"]["a"], body["item"]["b"]]
    elif body["kind"] == "chain":
        inner = body.get("blocks", []) + body.get("txs", [])
    return any(e["body"]["sender"] == victim for e in inner)


_VIEWS: dict[tuple, View] = {}


def victim_view(victim: str, compromised: bool) -> View:
    """The corpus as the victim's peers can use it: every key but the victim's, unless its key
    is ``compromised`` (then the victim may see messages it never signed in this life)."""
    if (victim, compromised) not in _VIEWS:
        if compromised:
            view = View(lambda dev, kind: True, victim, C.messages)
        else:
            view = View(lambda dev, kind: dev != victim or kind not in SLOT_KINDS, victim,
                        [m for m in C.messages if not from_other_life(victim, m)])  # fmt: skip
        _VIEWS[victim, compromised] = view
    return _VIEWS[victim, compromised]


# ---- building the messages of a step -------------------------------------------------------


def _payload(obj) -> bytes:
    """Canonical bytes when the value can be canonical, else plain JSON (a huge integer, a
    lone surrogate: the node must refuse it)."""
    try:
        return canonical_bytes(obj)
    except CanonicalError:
        return json.dumps(obj).encode()


def _is_env(obj) -> bool:
    return isinstance(obj, dict) and set(obj) == {"body", "sig"} and isinstance(obj["body"], dict)


def _resign(env: dict, fallback: str, may_sign) -> None:
    """Sign ``env``'s (mutated) body with the real key of the sender it names (or of
    ``fallback``, the original sender, when it names none)."""
    if not _is_env(env):
        return  # the mutation took its body or signature away
    body = env["body"]
    sender = body.get("sender")
    dev = sender if isinstance(sender, str) and sender in C.keys else fallback
    kind = body.get("kind")
    if not may_sign(dev, kind if isinstance(kind, str) else ""):
        return
    try:
        env["sig"] = sign(C.keys[dev], body).sig
    except (CanonicalError, TypeError, ValueError, AttributeError):
        pass  # a body that cannot be canonical cannot be signed: the old signature stays


def mutate(obj, path, op, value, extra_key):
    """Apply ``op`` at the place ``path`` picks in ``obj`` (in place): each number picks a
    member of the current object or list, descending while there is one. Returns the
    envelopes the path went through, outermost first."""
    envs = [obj] if _is_env(obj) else []
    cont, key = obj, None
    for n, choice in enumerate(path):
        if isinstance(cont, dict) and cont:
            key = sorted(cont)[choice % len(cont)]
        elif isinstance(cont, list) and cont:
            key = choice % len(cont)
        else:
            key = None
            break
        child = cont[key]
        if n + 1 < len(path) and isinstance(child, (dict, list)) and child:
            if _is_env(child):
                envs.append(child)
            cont = child
        else:
            break
    value = copy.deepcopy(value)
    if key is None or op == "add":
        if isinstance(cont, dict):
            cont[extra_key] = value
        elif isinstance(cont, list):
            cont.insert(key or 0, value)
    elif op == "replace":
        cont[key] = value
    elif op == "delete":
        del cont[key]
    elif op == "dup":
        if isinstance(cont, list):
            cont.insert(key, copy.deepcopy(cont[key]))
        else:
            cont[key] = [cont[key], copy.deepcopy(cont[key])]
    return envs


def _state(at, states=()) -> ledger.State:
    """A state to build on: one of the honest chain's (an index), or the victim's head or its
    parent (``"head"``, ``"parent"``: messages for the round it is in, a rival of its head)."""
    if at == "head" and states:
        return states[-1]
    if at == "parent" and states:
        return states[-2] if len(states) > 1 else states[-1]
    return pick(C.states, at if isinstance(at, int) else 0)


def _signer(spec, state) -> str:
    """A device: by index, or (role, k) the k-th device of that role in the round after ``state``."""
    if isinstance(spec, int):
        return pick(C.devices, spec)
    role, k = spec
    return pick(getattr(ledger.roles_for(C.genesis, state), role), k) or C.devices[0]


def _wtx_body(dev, state, model, rnd=None):
    body = ledger.make_wtx(C.genesis, state, dev, model)
    if rnd is not None:
        body["round"] = rnd
    return body


def _vtx_body(dev, state, votes_spec, extra_ids, rnd=None):
    """A validator tx whose votes follow from the evaluation they record (so it passes the
    gossip rules) but name any worker and any worker tx id."""
    fake = []
    for worker, wtx_i, model_i, acc, loss in votes_spec:
        wid, model = pick(C.hashes, wtx_i), pick(C.hashes, model_i)
        fake.append((worker, wid, model, acc, loss))
    fake = list({w[1]: w for w in fake}.values())  # one vote a tx id
    envs = [Envelope(body={"sender": w, "model": m}, sig="", id=i) for w, i, m, _, _ in fake]
    scores = {m: (acc, loss) for _, _, m, acc, loss in fake}
    votes = ledger.cast_votes(C.genesis, envs, scores, 0, None)
    verified = [e.id for e in envs] + [pick(C.hashes, i) for i in extra_ids]
    body = ledger.make_vtx(C.genesis, state, dev, verified, votes)
    if rnd is not None:
        body["round"] = rnd
    return body


def _block_body(dev, state, with_txs, gm_i, rnd=None):
    wtxs, vtxs = C.txs.get(state.height + 1, ([], [])) if with_txs else ([], [])
    gm = pick(C.hashes, gm_i) if with_txs else state.global_model
    body = ledger.build_block(C.genesis, state, dev, list(wtxs), list(vtxs), gm)
    if rnd is not None:
        body["round"] = body["height"] = rnd
    return body


def _pair(who, kind, rnd, state) -> dict:
    """Real evidence: two different messages ``who`` signed for one slot, at round ``rnd``."""
    if kind == "wtx":
        a, b = _wtx_body(who, state, "aa" * 32, rnd), _wtx_body(who, state, "bb" * 32, rnd)
    elif kind == "vtx":
        a, b = _vtx_body(who, state, [], [], rnd), _vtx_body(who, state, [], [0], rnd)
    else:
        a, b = _block_body(who, state, False, 0, rnd), _block_body(who, state, False, 0, rnd)
        b["global_model"] = "cc" * 32
    return ledger.evidence_item(sign(C.keys[who], a), sign(C.keys[who], b))


def _any_signed(dev, body, may_sign):
    """The envelope of ``body`` signed by ``dev`` (JSON; with a junk signature when the body
    cannot be canonical); None when the step may not sign as ``dev``."""
    if not may_sign(dev, body["kind"]):
        return None
    try:
        return sign(C.keys[dev], body).to_json()
    except CanonicalError:
        return {"body": body, "sig": "00" * 64}


def build_message(step, view: View, extra=(), states=()) -> tuple[str, bytes] | None:
    """The (topic, payload) a message step delivers (None: nothing, the step may not sign
    what it needs); ``extra``: more messages it may replay (the victim's own); ``states``:
    the victim's chain states (for messages built on its head)."""
    tag = step[0]
    run, may_sign, me = C.run, view.may_sign, view.me
    if tag == "replay":
        return pick(view.messages + list(extra), step[1])
    if tag == "misroute":  # a real payload on another topic
        _, i, kind, d = step
        msg = pick(view.messages + list(extra), i)
        if msg is None:
            return None
        payload = msg[1]
        extra = sha256_hex(payload) if kind == "blob" else None
        return topic(run, kind, pick(C.devices, d), extra), payload
    if tag == "mutate":
        _, i, path, op, value, extra_key, mode, follow = step
        if not view.json_messages:
            return None
        t, payload = pick(view.json_messages, i)
        obj = json.loads(payload)
        orig = obj["body"]["sender"]
        envs = mutate(obj, path, op, value, extra_key)
        if mode == "deep":
            for env in reversed(envs):
                _resign(env, orig, may_sign)
        elif mode == "outer" and envs and envs[0] is obj:
            _resign(obj, orig, may_sign)
        body = obj.get("body") if isinstance(obj, dict) else None
        if follow and isinstance(body, dict):
            kind, sender = body.get("kind"), body.get("sender")
            if kind in RUN_KINDS and kind != "blob" and isinstance(sender, str) and valid_id(sender):
                t = topic(run, kind, sender)
        return t, _payload(obj)
    if tag == "bytes":
        _, kind, d, data = step
        dev = pick(C.devices + ["ghost"], d)
        extra = sha256_hex(data) if kind == "blob" else None
        return topic(run, kind, dev, extra), data
    if tag == "topic":
        _, name, data = step
        return name, data
    if tag == "json":
        _, kind, d, value, wrap = step
        obj = {"body": value, "sig": "00" * 64} if wrap else value
        return topic(run, kind, pick(C.devices, d)), _payload(obj)
    if tag == "blob":
        _, d, data, right_hash = step
        if isinstance(data, int):
            data = pick(sorted(C.blobs.values()), data)
        h = sha256_hex(data) if right_hash else pick(C.hashes, len(data))
        return topic(run, "blob", pick(C.devices, d), h), data
    # signed by a real key
    if tag in SLOT_KINDS:  # (tag, signer, at, ...): built on a state, by a device of a role there
        state = _state(step[2], states)
        dev = _signer(step[1], state)
    else:
        dev = pick(C.devices, step[1])
    if tag == "wtx":
        _, _, _, model_i, rnd = step
        env = _any_signed(dev, _wtx_body(dev, state, pick(C.hashes, model_i), rnd), may_sign)
    elif tag == "vtx":
        _, _, _, votes, extra_ids, rnd = step
        env = _any_signed(dev, _vtx_body(dev, state, votes, extra_ids, rnd), may_sign)
    elif tag == "block":
        _, _, _, with_txs, gm_i, rnd = step
        env = _any_signed(dev, _block_body(dev, state, with_txs, gm_i, rnd), may_sign)
    elif tag == "sync":
        _, _, rnd, fields = step
        body = {"run": run, "kind": "sync", "round": rnd, "sender": dev, "nonce": 1, **fields}
        if body.get("target") == "@me":
            body["target"] = me
        env = _any_signed(dev, body, may_sign)
    elif tag == "chain":
        _, _, rnd, to, blocks, txs = step
        body = {"run": run, "kind": "chain", "round": rnd, "sender": dev, "to": me if to == "@me" else to,
                "blocks": [_chain_item(b, view.blocks, may_sign, states) for b in blocks],
                "txs": [_chain_item(t, view.wtxs, may_sign, states) for t in txs]}  # fmt: skip
        env = _any_signed(dev, body, may_sign)
    elif tag == "evidence":
        _, _, rnd, item = step
        if item[0] == "junk":
            it = item[1]
        elif item[0] == "real":
            it = pick(view.evidence_items, item[1])
        else:
            _, who, kind, prnd, at = item
            state = _state(at, states)
            who = _signer(who, state)
            if not may_sign(who, kind):
                return None
            it = _pair(who, kind, prnd, state)
        env = _any_signed(dev, {"run": run, "kind": "evidence", "round": rnd, "sender": dev, "item": it}, may_sign)
    elif tag == "head":
        _, _, height, head_i = step
        head = pick(C.heads, head_i) if isinstance(head_i, int) else head_i
        body = {"run": run, "kind": "head", "round": max(height, 0), "sender": dev, "height": height, "head": head}
        env = _any_signed(dev, body, may_sign)
    else:
        raise AssertionError(f"not a message step: {step!r}")
    if env is None:
        return None
    return topic(run, env["body"]["kind"], dev), _payload(env)


def _chain_item(spec, pool, may_sign, states):
    if spec[0] == "junk":
        return spec[1]
    if spec[0] == "real":
        env = pick(pool, spec[1])
        return env.to_json() if env is not None else None
    _, d, at, rnd = spec  # a forged candidate
    state = _state(at, states)
    dev = _signer(d, state)
    if not may_sign(dev, "block"):
        return None
    return sign(C.keys[dev], _block_body(dev, state, False, 0, rnd)).to_json()


# ---- the shell around the victim, and the invariants ----------------------------------------

_REPLAYED: dict[tuple, ledger.State] = {}


def replay_states(blocks) -> list[ledger.State]:
    """``ledger.replay`` of every prefix of ``blocks`` (memoised by block ids and signatures:
    an id fixes the block's content)."""
    out = []
    for i in range(len(blocks) + 1):
        k = tuple((b.id, b.sig) for b in blocks[:i])
        if k not in _REPLAYED:
            _REPLAYED[k] = ledger.replay(C.genesis, blocks[:i])
        out.append(_REPLAYED[k])
    return out


def _decodable(data: bytes):
    try:
        return vec_of(data)
    except Exception:  # junk bytes stored under a hash some tx named
        return None


class Harness:
    """A victim Node and a shell that carries out its actions the way tests/simnet.py does
    (with the blob store of this device only), recording what the invariants need."""

    def __init__(self, victim: str, compromised: bool = False):
        self.me = victim
        self.compromised = compromised
        self.view = victim_view(victim, compromised)
        #: the honest run's messages but the victim's own there (its node here makes its own)
        self.stream = [m for m in C.honest if parse_topic(m[0]).device != victim]
        self.store: dict[str, bytes] = {C.init: C.init_blob}
        self.node = nd.Node(victim, C.keys[victim], C.genesis, have_blob=self.store.__contains__)
        self.now = 0.0
        self.outstanding: list = []  # Train / Evaluate / Aggregate / EvaluateGlobal not answered
        self.stored: set[str] = set()  # announced by StoreBlob and not deleted since
        self.committed: list[Envelope] = []  # CommitBlock minus Rollback: what a store persists
        self.my_slots: dict[tuple, str] = {}  # slot -> id of the wtx/vtx/block the victim signed
        self.published: list[tuple[str, bytes]] = []
        self.cursor = 0
        self.apply(self.node.start(self.now))
        self.check()

    # -- driving --

    def handle(self, event):
        self.apply(self.node.handle(event, self.now))
        self.check()

    def tick(self, dt: float):
        self.now += dt
        self.apply(self.node.tick(self.now))
        self.check()

    def deliver(self, msg):
        if msg is not None:
            self.handle(nd.Received(*msg))

    def answer(self, a):
        """What the shell honestly returns for action ``a``."""
        if isinstance(a, nd.Train):
            base = _decodable(self.store.get(a.base_model, b""))
            if base is None:
                return nd.TaskFailed("train", str(a.round), "no base model")
            rng = np.random.default_rng(a.seed)
            return nd.TrainingDone(a.round, blob_of(base + 0.5 * (TARGET - base) + rng.normal(0, 0.01, DIM).astype(np.float32)))
        if isinstance(a, nd.Evaluate):
            res, loss = {}, {}
            for h in a.models:
                v = _decodable(self.store.get(h, b""))
                res[h] = accuracy_bp(v) if v is not None else 0
                loss[h] = int(1000 * float(np.sum((v - TARGET) ** 2))) if v is not None else ledger.LOSS_UNUSABLE
            base = _decodable(self.store.get(a.base_model, b""))
            g = accuracy_bp(base) if base is not None else 0
            return nd.EvaluationDone(a.round, g, g, res, loss)
        if isinstance(a, nd.Aggregate):
            missing = tuple(h for h, _ in a.inputs if h not in self.store)
            if missing:
                return nd.AggregateDone(a.key, None, missing)
            vecs = [_decodable(self.store[h]) for h, _ in a.inputs]
            if any(v is None for v in vecs) or not a.inputs:
                return nd.TaskFailed("aggregate", a.key, "undecodable blob")
            total = sum(n for _, n in a.inputs)
            acc = sum(v.astype(np.float64) * n for v, (_, n) in zip(vecs, a.inputs)) / total
            data = blob_of(acc.astype(np.float32))
            self.store[sha256_hex(data)] = data
            return nd.AggregateDone(a.key, sha256_hex(data))
        if isinstance(a, nd.EvaluateGlobal):
            v = _decodable(self.store.get(a.model_hash, b""))
            return nd.GlobalEvaluated(a.height, a.model_hash, accuracy_bp(v) if v is not None else 0)
        raise AssertionError(a)

    # -- the actions, checked as they come --

    def apply(self, actions):
        node = self.node
        for a in actions:
            if isinstance(a, nd.Publish):
                self.check_publish(a)
                self.published.append((a.topic, a.payload))
            elif isinstance(a, nd.StoreBlob):
                assert sha256_hex(a.data) == a.hash, "StoreBlob of bytes that are not its hash"
                self.stored.add(a.hash)
                self.store[a.hash] = a.data
            elif isinstance(a, nd.DeleteBlob):
                self.stored.discard(a.hash)  # the bytes stay in the shell (as in SimNet)
            elif isinstance(a, (nd.Train, nd.Evaluate, nd.Aggregate, nd.EvaluateGlobal)):
                self.outstanding.append(a)
            elif isinstance(a, nd.CommitBlock):
                assert a.block.body["height"] == len(self.committed) + 1, "CommitBlock out of order"
                self.committed.append(a.block)
            elif isinstance(a, nd.Rollback):
                assert 0 <= a.height < len(self.committed), "Rollback above the persisted chain"
                del self.committed[a.height :]
            elif isinstance(a, nd.BlobRequestAnswer):
                assert a.hash in self.store, "asked to re-publish a blob the store does not hold"
            elif isinstance(a, nd.Score):
                assert a.model in self.stored, "asked to score a blob it did not store"
            elif isinstance(a, nd.Finished):
                assert a.state == node.state
            elif isinstance(a, nd.Dropped):
                assert a.reason in DROP_REASONS and a.count >= 1
            elif isinstance(a, nd.RoundStarted):
                assert a.round == node.state.height + 1 or a.round <= len(self.committed) + 1
            else:
                raise AssertionError(f"unknown action {a!r}")

    def check_publish(self, a: nd.Publish):
        tp = parse_topic(a.topic)
        assert tp.run == C.run and tp.device == self.me, a.topic
        if tp.kind == "blob":
            assert len(a.payload) <= self.node.max_blob_bytes and sha256_hex(a.payload) == tp.extra
            return
        assert len(a.payload) <= MAX_JSON_BYTES, f"{tp.kind} of {len(a.payload)} bytes"
        try:
            env = decode(a.payload)
            check_signature(env, C.genesis.pubkey(self.me))
        except Drop as exc:  # pragma: no cover - reported by the assertion
            raise AssertionError(f"the node published a message its peers drop: {exc}") from None
        assert env.kind == tp.kind and env.sender == self.me and env.body["run"] == C.run
        assert a.retain == (tp.kind == "head")
        if env.kind in SLOT_KINDS and not self.compromised:
            # an honest node never signs two different messages for one slot (it would be slashed)
            first = self.my_slots.setdefault(ledger.slot(env), env.id)
            assert first == env.id, f"the node equivocated: two {env.kind}s for slot {ledger.slot(env)[1:3]}"

    def check(self):
        node, g = self.node, C.genesis
        # every drop reason is a known one
        assert set(node.drops) <= set(DROP_REASONS), set(node.drops) - set(DROP_REASONS)
        # the chain: heights consecutive, each block on the previous head, states = replay
        assert len(node.states) == len(node.chain) + 1
        for i, blk in enumerate(node.chain):
            assert blk.body["height"] == i + 1 and blk.body["prev"] == node.states[i].head
            assert node.states[i + 1].height == i + 1 and node.states[i + 1].head == blk.id
        assert node.states == replay_states(node.chain)
        # what the shell persisted (CommitBlock / Rollback) is the chain the node holds
        assert [b.id for b in self.committed] == [b.id for b in node.chain]
        # the round context follows the head; finished exactly at the last height
        assert node.ctx is None or node.ctx.round == node.state.height + 1
        assert node.finished == (node.state.height >= g.rounds)
        assert (node.ctx is None) == node.finished
        # blobs: stored only through StoreBlob and not deleted since; pending ones bounded
        assert node.blobs <= self.stored, node.blobs - self.stored
        for sender, held in node.pending.items():
            assert sender in g.devices and len(held) <= nd.PENDING_BLOBS_PER_SENDER
            assert all(sha256_hex(d) == h for h, d in held.items())
        # memory bounded: future buffers, candidates, evidence, claims
        for r, q in node.future.items():
            assert len(q) <= nd.FUTURE_LIMIT and r <= g.rounds + nd.FUTURE_ROUNDS
            assert node.ctx is None or r > node.ctx.round, f"buffered round {r} at round {node.ctx.round}"
        for h, cands in node.candidates.items():
            assert 1 <= h <= g.rounds, f"candidates for height {h}"
            assert all(c.body["height"] == h and c.id == i for i, c in cands.items())
            per_miner = Counter(c.sender for c in cands.values())
            assert max(per_miner.values(), default=0) <= 2, per_miner
        assert set(node.evidence) <= set(g.devices)
        assert all(1 <= r <= g.rounds for r in node.block_evidence), f"block evidence kept for rounds {sorted(node.block_evidence)}"
        assert set(node.peer_heights) <= set(g.devices) and all(h <= g.rounds for h in node.peer_heights.values())
        assert len(node.invalid) <= 2 * N * g.rounds and len(node.pulled) <= 2 * N * g.rounds
        ctx = node.ctx
        if ctx is not None:
            # a miner asks for the worker txs the validators' votes name: at most 2|W| a validator
            bound = 2 * len(ctx.roles.workers) * len(ctx.roles.validators)
            assert len(ctx.asked) <= bound, f"a miner asked for {len(ctx.asked)} worker txs (2|W||V| = {bound})"
            per_worker = Counter(e.sender for e in ctx.wtxs.values())
            assert set(per_worker) <= set(ctx.roles.workers) and max(per_worker.values(), default=0) <= 2
            assert set(ctx.vtxs) <= set(ctx.roles.validators)
            assert all(e.round == ctx.round for e in list(ctx.wtxs.values()) + list(ctx.vtxs.values()))


# ---- steps -----------------------------------------------------------------------------------


def run_steps(victim: str, steps, pace: int = 0, dt: float = 0.5, compromised: bool = False) -> Harness:
    """Drive a fresh victim with ``steps``; every step is checked (``Harness.check``). With
    ``pace``, each step is followed by the honest run's next ``pace`` messages, ``dt``
    seconds and the shell's honest answers: the victim goes through the rounds amid the
    noise (a long ``dt``: every deadline passes before the shell answers). ``compromised``:
    the steps may sign with the victim's key too."""
    hz = Harness(victim, compromised)
    quantum = [("next", pace), ("tick", dt), ("settle",)] if pace else []
    for step in (s for st_ in steps for s in [st_, *quantum]):
        run_step(hz, step)
    return hz


def run_step(hz: Harness, step) -> None:
    tag = step[0]
    if tag == "tick":
        hz.tick(step[1])
    elif tag == "next":  # the honest run's next messages, in order
        for msg in hz.stream[hz.cursor : hz.cursor + step[1]]:
            hz.deliver(msg)
        hz.cursor += step[1]
    elif tag == "settle":  # the shell answers everything it was asked, honestly
        for _ in range(30):
            if not hz.outstanding:
                break
            hz.handle(hz.answer(hz.outstanding.pop(0)))
    elif tag == "shell":  # one answer, in any order (late ones too)
        if hz.outstanding:
            hz.handle(hz.answer(hz.outstanding.pop(step[1] % len(hz.outstanding))))
    elif tag in SHELL_EVENTS:
        hz.handle(shell_event(hz, step))
    elif tag in ("bytes", "topic", "json"):  # junk: dropped, and counted
        msg = build_message(step, hz.view)
        before = sum(hz.node.drops.values()) + hz.node.duplicates
        hz.deliver(msg)
        if not _may_pass_silently(hz.me, msg):
            assert sum(hz.node.drops.values()) + hz.node.duplicates > before, f"junk on {msg[0]} not counted as a drop"
    else:
        hz.deliver(build_message(step, hz.view, hz.published, hz.node.states))


def _may_pass_silently(me: str, msg) -> bool:
    """A blob (held until a tx names it), or a chain answer to another device (every device
    sees the answers to all): traffic a node ignores without dropping it."""
    try:
        if parse_topic(msg[0]).kind == "blob":
            return True
        body = decode(msg[1]).body
    except Drop:
        return False
    return body["kind"] == "chain" and body.get("to") != me


SHELL_EVENTS = ("train_done", "eval_done", "agg_done", "failed", "global_eval")


def _key(hz, k):
    """An aggregation key: 'mine', the block being checked, a held candidate, any id."""
    node = hz.node
    if k == "@checking":
        return (node.ctx.checking if node.ctx else None) or "mine"
    if k == "@cand":
        ids = sorted(i for c in node.candidates.values() for i in c)
        return ids[0] if ids else "mine"
    return k if isinstance(k, str) else pick(C.hashes, k)


def shell_event(hz, step):
    """A shell event that answers nothing the node asked for, or answers it wrongly."""
    tag = step[0]
    if tag == "train_done":
        _, rnd, blob = step
        return nd.TrainingDone(rnd, pick(sorted(C.blobs.values()), blob) if isinstance(blob, int) else blob)
    if tag == "eval_done":
        _, rnd, g, t, scores = step
        return nd.EvaluationDone(rnd, g, t, {pick(C.hashes, h): a for h, a, _ in scores},
                                 {pick(C.hashes, h): loss for h, _, loss in scores})  # fmt: skip
    if tag == "agg_done":
        _, k, h, missing = step
        return nd.AggregateDone(_key(hz, k), None if h is None else pick(C.hashes, h), tuple(pick(C.hashes, m) for m in missing))
    if tag == "failed":
        _, task, k = step
        return nd.TaskFailed(task, _key(hz, k), "boom")
    _, height, h, acc, extra = step
    return nd.GlobalEvaluated(height, pick(C.hashes, h), acc, extra)


# ---- strategies ----------------------------------------------------------------------------

IDX = st.integers(0, 1 << 16)
DEV = st.integers(0, N - 1)
#: a state to build on, a device of a role there (``_state``, ``_signer``)
AT = st.one_of(st.sampled_from(["head", "parent"]), IDX)
SIGNER = st.one_of(st.tuples(st.sampled_from(["workers", "validators", "miners"]), st.integers(0, 3)), DEV)
ROUND = st.integers(0, ROUNDS + 2)
HOSTILE_INT = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, ROUNDS + 1, 64, 65, 10**9, 2**53 - 1, 2**53, -(2**53)]),
    st.integers(-(2**64), 2**64),
)
ANY_ROUND = st.one_of(ROUND, HOSTILE_INT.filter(lambda n: 0 <= n < 2**53))
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    HOSTILE_INT,
    st.text(max_size=10),
    st.sampled_from(C.strings),
    st.sampled_from(C.hashes),
)
JSON = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(C.fields) | st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
BLOB = st.one_of(IDX, st.binary(max_size=48))
STR_LIST = st.lists(st.one_of(st.sampled_from(C.devices), st.sampled_from(C.hashes), st.text(max_size=4)), max_size=5)

SYNC_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "blobs": st.one_of(st.lists(st.sampled_from(C.hashes), max_size=4), JSON, st.lists(st.just("ab" * 32), min_size=65, max_size=66)),
        "wtx_of": st.one_of(STR_LIST, JSON),
        "vtx_of": st.one_of(STR_LIST, JSON),
        "tx_ids": st.one_of(st.lists(st.sampled_from(C.hashes), max_size=4), JSON),
        "target": st.one_of(st.just("@me"), st.sampled_from(C.devices), JSON),
        "from_height": st.one_of(st.integers(-2, ROUNDS + 2), st.booleans(), HOSTILE_INT, JSON),
    },
)
CHAIN_ITEM = st.one_of(
    st.tuples(st.just("real"), IDX),
    st.tuples(st.just("junk"), JSON),
    st.tuples(st.just("forged"), SIGNER, AT, st.none() | ANY_ROUND),
)
PAIR = st.tuples(st.just("pair"), SIGNER, st.sampled_from(SLOT_KINDS), ANY_ROUND, AT)
EVIDENCE_ITEM = st.one_of(st.tuples(st.just("junk"), JSON), st.tuples(st.just("real"), IDX), PAIR)
VOTE_SPEC = st.tuples(st.sampled_from(C.devices + ["ghost"]), IDX, IDX, st.integers(-5, 10_001), st.integers(0, 10**9))

#: messages, with the keys of the victim's peers (``build_message``)
MESSAGE_STEPS = [
    st.tuples(st.just("replay"), IDX),
    st.tuples(st.just("misroute"), IDX, st.sampled_from(SUBSCRIBED + OTHER_KINDS), DEV),
    st.tuples(st.just("mutate"), IDX, st.lists(st.integers(0, 63), min_size=1, max_size=6),
              st.sampled_from(("replace", "delete", "add", "dup")), JSON, st.sampled_from(C.fields),
              st.sampled_from(("none", "outer", "deep")), st.booleans()),  # fmt: skip
    st.tuples(st.just("bytes"), st.sampled_from(SUBSCRIBED + OTHER_KINDS), st.integers(0, N), st.binary(max_size=48)),
    st.tuples(st.just("topic"), st.one_of(st.text(max_size=30), st.sampled_from([f"bfl/v1/{C.run}/wtx", "bfl/v1/devices/d00/hello",
              f"bfl/v1/{C.run}/blob/d00/xyz", "bfl/v1/r2/wtx/d00", f"bfl/v1/{C.run}/wtx/d00/x"])), st.binary(max_size=16)),  # fmt: skip
    st.tuples(st.just("json"), st.sampled_from(SUBSCRIBED), DEV, JSON, st.booleans()),
    st.tuples(st.just("blob"), DEV, BLOB, st.booleans()),
    st.tuples(st.just("wtx"), SIGNER, AT, IDX, st.none() | ANY_ROUND),
    st.tuples(st.just("vtx"), SIGNER, AT, st.lists(VOTE_SPEC, max_size=4), st.lists(IDX, max_size=2), st.none() | ANY_ROUND),
    st.tuples(st.just("block"), SIGNER, AT, st.booleans(), IDX, st.none() | ANY_ROUND),
    st.tuples(st.just("sync"), DEV, ANY_ROUND, SYNC_FIELDS),
    st.tuples(st.just("chain"), DEV, ANY_ROUND, st.one_of(st.just("@me"), st.sampled_from(C.devices), JSON),
              st.lists(CHAIN_ITEM, max_size=3), st.lists(CHAIN_ITEM, max_size=2)),  # fmt: skip
    st.tuples(st.just("evidence"), DEV, ANY_ROUND, EVIDENCE_ITEM),
    st.tuples(st.just("head"), DEV, st.integers(-2, ROUNDS + 2), st.one_of(IDX, JSON)),
]
KEY = st.one_of(st.sampled_from(["mine", "@checking", "@cand", "0", "1", "2"]), IDX)
SHELL_STEPS = [
    st.tuples(st.just("train_done"), ROUND, BLOB),
    st.tuples(st.just("eval_done"), ROUND, st.integers(-5, 10_001), st.none() | st.integers(-5, 10_001),
              st.lists(st.tuples(IDX, st.integers(-(10**6), 10**6), st.integers(-(10**12), 10**12)), max_size=3)),  # fmt: skip
    st.tuples(st.just("agg_done"), KEY, st.none() | IDX, st.lists(IDX, max_size=2)),
    st.tuples(st.just("failed"), st.sampled_from(("train", "evaluate", "aggregate", "evaluate_global")), KEY),
    st.tuples(st.just("global_eval"), ROUND, IDX, st.integers(0, 10_000),
              st.dictionaries(st.text(max_size=5), st.integers(0, 10**6) | st.text(max_size=3), max_size=2)),  # fmt: skip
]
DRIVE_STEPS = [
    st.tuples(st.just("tick"), st.sampled_from([0.0, 0.5, 1.0, 3.0, 5.0, 10.0, 31.0])),
    st.tuples(st.just("next"), st.integers(1, 40)),
    st.tuples(st.just("settle")),
    st.tuples(st.just("shell"), st.integers(0, 7)),
]
# honest progress is drawn as often as hostility, so the victim gets through the rounds
STEP = st.one_of(*DRIVE_STEPS, *DRIVE_STEPS, *DRIVE_STEPS, *MESSAGE_STEPS, *SHELL_STEPS)

#: deterministic (the same examples on every run, no example database); no "explain" phase,
#: whose extra runs would double the time a failure takes to report
PHASES = (Phase.explicit, Phase.generate, Phase.shrink)
FUZZ = settings(max_examples=600, deadline=None, derandomize=True, database=None, print_blob=False, phases=PHASES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


@FUZZ
@given(victim=st.sampled_from(C.devices), steps=st.lists(STEP, min_size=10, max_size=60),
       pace=st.sampled_from([0, 3, 8, 16]), dt=st.sampled_from([0.5, 2.0, 11.0]),
       compromised=st.booleans())  # fmt: skip
def test_victim_survives_hostile_event_sequences(victim, steps, pace, dt, compromised):
    hz = run_steps(victim, steps, pace, dt, compromised)
    event(f"height {hz.node.state.height}")
    event(f"steps {len(steps) // 10 * 10}+")
    for r in hz.node.drops:
        event(f"drop {r}")
    if hz.node.reorgs:
        event("reorg")


def test_corpus_is_real():
    """The corpus holds what the steps need: every kind, evidence, second candidates."""
    kinds = Counter(t.split("/")[3] for t, _ in C.messages)
    assert all(kinds[k] for k in SUBSCRIBED), kinds
    assert C.evidence_items and len(C.blocks) > ROUNDS * ROLES[2]
    assert len(C.states) == ROUNDS + 1


# ---- liveness: hostile noise in an honest SimNet run ----------------------------------------


#: the device whose key the noise may sign transactions and blocks with (a compromised key):
#: its slot messages may be doubled, so it may be slashed; every other key signs only
#: messages that fill no slot (sync requests, chain answers, head claims, evidence)
COMPROMISED = ledger.roles_for(C.genesis, C.states[0]).validators[0]
B = C.devices.index(COMPROMISED)
#: messages signed with the compromised key, built on its node's head (or parent)
COMPROMISED_STEPS = [
    st.tuples(st.just("wtx"), st.just(B), AT, IDX, st.none()),
    st.tuples(st.just("vtx"), st.just(B), AT, st.lists(VOTE_SPEC, max_size=3), st.lists(IDX, max_size=2), st.none()),
    st.tuples(st.just("block"), st.just(B), AT, st.booleans(), IDX, st.none()),
    st.tuples(st.just("evidence"), DEV, ROUND, st.tuples(st.just("pair"), st.just(B), st.sampled_from(SLOT_KINDS), ROUND, AT)),
]
NOISE = st.tuples(st.integers(0, 1000), st.one_of(*MESSAGE_STEPS, *COMPROMISED_STEPS),
                  st.none() | st.lists(DEV, min_size=1, max_size=4))  # fmt: skip


@settings(max_examples=20, deadline=None, derandomize=True, database=None, print_blob=False, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(seed=st.integers(0, 2**32 - 1), noise=st.lists(NOISE, min_size=5, max_size=60))
def test_liveness_with_hostile_noise_in_random_delivery_orders(seed, noise):
    """An honest SimNet run, every message delivered in a random order, with hostile messages
    injected at random points (to every device or some): every device still finishes with
    the same chain of every round, which replays, and the drops are known reasons."""
    net = run_with_noise(seed, noise)
    heads = {d: n.state.head for d, n in net.nodes.items()}
    assert len(set(heads.values())) == 1, {d: n.state.height for d, n in net.nodes.items()}
    chain = next(iter(net.nodes.values())).chain
    assert len(chain) == ROUNDS and ledger.replay(C.genesis, chain).head == chain[-1].id
    for d, n in net.nodes.items():
        assert n.finished and [b.id for b in net.committed[d]] == [b.id for b in chain]
        assert set(n.drops) <= set(DROP_REASONS)
    event(f"compromised key slashed: {COMPROMISED in ledger.replay(C.genesis, chain).slashed}")
    event(f"reorganised: {any(n.reorgs for n in net.nodes.values())}")
    for r in set().union(*(n.drops for n in net.nodes.values())):
        event(f"drop {r}")


def run_with_noise(seed, noise) -> SimNet:
    net = SimNet(n=N, roles=ROLES, rounds=ROUNDS, rng=np.random.default_rng(seed))
    assert net.genesis.hash == C.genesis.hash
    view = View(lambda dev, kind: kind not in SLOT_KINDS or dev == COMPROMISED)
    schedule = sorted(noise, key=lambda n: n[0])
    steps = [0]

    def inject():  # SimNet.run's ``until`` hook: called before each delivery
        steps[0] += 1
        while schedule and schedule[0][0] <= steps[0]:
            _, spec, dests = schedule.pop(0)
            view.add((p.topic, p.payload) for p in net.published[len(view.messages) :])  # replayable
            msg = build_message(spec, view, (), net.nodes[COMPROMISED].states)
            if msg is not None:
                net.send(nd.Publish(*msg), None if dests is None else sorted({pick(C.devices, d) for d in dests}))
        return False

    net.start()
    net.run(max_steps=400_000, until=inject)
    return net


# ---- reorganising: an honest device never signs twice for one slot ---------------------------


def until_height(hz: Harness, h: int) -> Harness:
    """Deliver the honest run's messages, the shell answering at once, until the victim holds
    block ``h``."""
    for msg in hz.stream:
        if hz.node.state.height >= h:
            break
        hz.deliver(msg)
        while hz.outstanding:
            hz.handle(hz.answer(hz.outstanding.pop(0)))
    assert hz.node.state.height >= h
    return hz


@settings(max_examples=100, deadline=None, derandomize=True, database=None, print_blob=False, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(role=st.sampled_from(["workers", "validators", "miners"]), k=st.integers(0, 2), height=st.integers(1, ROUNDS),
       rival=st.integers(0, ROLES[2] - 1), wait=st.sampled_from([0.5, 3.0, 11.0, 21.0, 31.0]),
       then=st.lists(st.one_of(*DRIVE_STEPS), max_size=10))  # fmt: skip
def test_no_second_message_for_a_slot_after_a_reorganisation(role, k, height, rival, wait, then):
    """A device of each role at block ``height`` gets a rival block for its head from a miner
    of that height (a second block of the head's miner is evidence against it; one of
    another miner may be better): whatever it reorganises to, however long the shell takes
    to answer (``wait``), it never signs a second, different transaction or block for a slot
    it filled (``Harness.check_publish``)."""
    victim = pick(getattr(ledger.roles_for(C.genesis, C.states[height - 1]), role), k)
    hz = until_height(Harness(victim), height)
    hz.deliver(build_message(("block", ("miners", rival), "parent", False, 0, None), hz.view, (), hz.node.states))
    hz.tick(wait)
    for step in then:
        run_step(hz, step)


# ---- reproducers of the bugs the properties found (minimised, deterministic) -----------------


@pytest.mark.parametrize("role, wait_s", [("validators", 11.0), ("miners", 21.0)])
def test_a_reorganised_round_never_makes_an_honest_device_sign_twice(role, wait_s):
    """A regression test. The bug, as found by test_victim_survives_hostile_event_sequences and
    test_no_second_message_for_a_slot_after_a_reorganisation, minimised.

    An honest validator (miner) of round 1 votes (proposes), appends block 1; then the miner
    of block 1 is shown to have signed a second block for height 1 (the equivocating miner
    of test_byzantine.py). The evidence reorganises the victim to height 0 and ``_begin_round``
    opens a fresh RoundCtx for round 1: every phase back to COLLECTING. The new decision waits
    for the shell's aggregation of the other candidate; when the train (train + validate)
    deadline passes before it comes, the victim votes (mines) round 1 again, on what this new
    context holds (nothing): a second, different validator tx (block) for the slot (sender,
    kind, 1, genesis) it already filled. Its peers hold both: evidence, and the honest device
    is slashed and blacklisted."""
    head_miner = C.chain[0].sender  # the honest chain's block 1: the victim appends it too
    victim = next(d for d in getattr(ledger.roles_for(C.genesis, C.states[0]), role) if d != head_miner)
    hz = until_height(Harness(victim), 1)
    assert hz.node.chain[0].id == C.chain[0].id and hz.my_slots
    second = ledger.build_block(C.genesis, C.states[0], head_miner, [], [], C.init)
    hz.deliver((topic(C.run, "block", head_miner), sign(C.keys[head_miner], second).payload()))
    assert hz.node.reorgs == 1 and hz.node.state.height == 0 and hz.outstanding  # checking the other candidate
    hz.tick(wait_s)  # before the fix: "the node equivocated: two vtxs (blocks) for slot ('vtx', 1)"


def test_block_evidence_outside_the_run_or_the_reorg_window_is_not_kept():
    """A regression test. The bug, as found by test_victim_survives_hostile_event_sequences, minimised.

    Evidence that a device signed two block headers for one slot is accepted for any round
    (``check_evidence`` does not bound it), and ``Node._learn_evidence`` records the
    equivocator in ``block_evidence[round]`` before anything looks at the round; entries are
    never removed. One admitted device can sign a pair for each of 2**53 rounds and have
    another (or itself) relay them: the victim's memory grows by one entry per message."""
    node = nd.Node("d01", C.keys["d01"], C.genesis)
    node.start(0.0)
    rounds = [0, ROUNDS + 1, 10**6, 2**53 - 1, *range(100, 140)]
    for rnd in rounds:
        item = _pair("d02", "block", rnd, C.states[0])
        env = sign(C.keys["d03"], {"run": C.run, "kind": "evidence", "round": rnd, "sender": "d03", "item": item})
        assert node.handle(nd.Received(topic(C.run, "evidence", "d03"), env.payload()), 0.0) is not None
    assert len(node.block_evidence) <= ROUNDS, f"{len(node.block_evidence)} rounds of block evidence kept"


def _full_chain(n, roles, rounds):
    """A chain of ``rounds`` blocks in which every worker's update is voted on by every
    validator: blocks of the size the genesis' roles give (built with the ledger's own
    functions, without a network)."""
    genesis, keys, _ = make_run(n=n, roles=roles, rounds=rounds, run="big")
    state, chain = ledger.genesis_state(genesis), []
    for r in range(1, rounds + 1):
        rl = ledger.roles_for(genesis, state)
        wtxs = [sign(keys[w], ledger.make_wtx(genesis, state, w, sha256_hex(f"{r}|{w}".encode()))) for w in rl.workers]
        scores = {w.body["model"]: (5000, 1000) for w in wtxs}
        votes = ledger.cast_votes(genesis, wtxs, scores, 0, None)
        vtxs = [sign(keys[v], ledger.make_vtx(genesis, state, v, [w.id for w in wtxs], votes)) for v in rl.validators]
        miner = rl.miners[0]
        blk = sign(keys[miner], ledger.build_block(genesis, state, miner, wtxs, vtxs, sha256_hex(f"G{r}".encode())))
        state, _ = ledger.process_block(genesis, state, blk)
        chain.append(blk)
    return genesis, keys, chain


def test_a_chain_answer_fits_the_message_limit_for_any_admitted_genesis():
    """A regression test. The bug, as found by checking the Publish invariant (every message a node publishes is within
    messages.MAX_JSON_BYTES, so its peers do not drop it as too_large) on larger runs than
    the fuzz's.

    ``check_block_bound`` admits a genesis when ONE block fits the message limit, but
    ``Node._on_sync`` answers a pull with up to PULL_BATCH (8) blocks in one chain message.
    With |W| = 40, |V| = 30 a block is ~380 kB (1 200 votes), so three of them are over the
    1 MiB limit: every peer drops the answer as ``too_large`` and a device that fell behind
    can never catch up by pulling."""
    genesis, keys, chain = _full_chain(n=72, roles=(40, 30, 2), rounds=3)
    me = "d00"
    node = nd.Node(me, keys[me], genesis, chain)
    node.start(0.0)
    req = sign(keys["d01"], {"run": genesis.run, "kind": "sync", "round": 1, "sender": "d01", "nonce": 1,
                             "target": me, "from_height": 1, "blobs": []})  # fmt: skip
    acts = node.handle(nd.Received(topic(genesis.run, "sync", "d01"), req.payload()), 0.0)
    answers = [a for a in acts if isinstance(a, nd.Publish) and "/chain/" in a.topic]
    assert answers and all(len(blk.payload()) <= ledger.MAX_BLOCK_BYTES for blk in chain)
    for a in answers:
        assert len(a.payload) <= MAX_JSON_BYTES, f"a chain answer of {len(a.payload)} bytes (limit {MAX_JSON_BYTES})"


def test_an_equivocating_validator_cannot_grow_a_miners_requests():
    """A regression test. The bug, as found by the ``ctx.asked`` bound of ``Harness.check`` (a miner asks for at most the
    2|W| worker txs each validator's one tx may name), with directed steps.

    ``Node._on_tx`` keeps the first validator tx of each validator (``ctx.vtxs.setdefault``)
    but calls ``_fetch_named_txs`` for every one that passes the gossip rules: each further,
    different tx of an equivocating validator naming 2|W| unknown ids adds them to
    ``ctx.asked`` and makes the miner publish one more sync request, though that tx is never
    used (and the first two already are evidence). One message, 2|W| ids kept for the round
    and a publication: memory and traffic grow with the equivocator's messages."""
    r1 = ledger.roles_for(C.genesis, C.states[0])
    miner, validator = r1.miners[-1], r1.validators[0]
    hz = Harness(miner)
    for i in range(3):  # three different validator txs of one validator, each naming 2|W| unknown worker txs
        unknown = [i * 2 * ROLES[0] + j for j in range(2 * ROLES[0])]
        hz.deliver(build_message(("vtx", C.devices.index(validator), "head", [], unknown, None), hz.view))
    # before the fix, Harness.check failed on the third: len(ctx.asked) 18 > 2|W||V| = 12


@pytest.mark.parametrize("role", ["validators", "miners", "workers"])
def test_one_miner_cannot_make_a_device_skip_the_round_with_its_own_block(role):
    """A regression test. The bug, as found by directed steps after the fuzz ("head" and "chain" steps signed by a miner),
    not by an invariant: a weakness of ``Node._network_moved_on``.

    A miner P of round 1 signs an empty candidate at once (no update can be in it yet), claims
    in a head message to have appended it, and sends it in a chain answer. The device takes
    the block as pulled from a peer that has appended it, so ``_network_moved_on`` holds: the
    round is ``catching_up``, no role work is done (the validator never votes, the other
    miner never mines) and P's empty block is appended at time 0. One device's claim stands
    for "the network": a miner can void every round it mines, with two messages."""
    r1 = ledger.roles_for(C.genesis, C.states[0])
    p = r1.miners[0]
    victim = next(d for d in getattr(r1, role) if d != p)
    hz = Harness(victim)
    empty = sign(C.keys[p], ledger.build_block(C.genesis, C.states[0], p, [], [], C.init))
    head = {"run": C.run, "kind": "head", "round": 1, "sender": p, "height": 1, "head": empty.id}
    answer = {"run": C.run, "kind": "chain", "round": 1, "sender": p, "to": victim, "blocks": [empty.to_json()]}
    hz.deliver((topic(C.run, "head", p), sign(C.keys[p], head).payload()))
    hz.deliver((topic(C.run, "chain", p), sign(C.keys[p], answer).payload()))
    assert hz.node.state.height == 0, f"{victim} appended {p}'s empty block 1 at t=0 on {p}'s word alone"
