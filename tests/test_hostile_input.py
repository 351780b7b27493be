"""Hostile input, as somebody on the broker without any device's key would send it: the
decoders (canonical.parse, messages.decode) and the operator's observer must refuse any bytes
with a counted reason, and forged announcements must not change what the operator believes.

The observer is fed a whole SimNet run (real keys, genesis, blocks, heads, reports), so its
post-genesis paths and everything computed from them afterwards (round results, chain,
summary, CSV rows) are exercised with the attacker's messages mixed in.
"""

from __future__ import annotations

import json
import queue
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_agent.protocol.canonical import MAX_DEPTH, MAX_SAFE_INT, CanonicalError, canonical_bytes, parse
from edge_agent.protocol.crypto import KeyPair
from edge_agent.protocol.messages import Drop, decode, device_topic, sign, topic
from edge_agent.transport import Incoming
from orchestrator.experiment import Experiment, RunConfig
from orchestrator.observer import Observer

from simnet import SimNet

RUN_KINDS = ("ack", "block", "head", "report")  # what the observer subscribes to under a run
ANNOUNCEMENTS = ("hello", "status")

#: The payloads that stopped `bfl run` (and their relatives), each refused as "malformed".
VECTORS = {
    "200 KB of [": b"[" * 200_000,
    'nested {"a": 100 000 deep': b'{"a":' * 100_000,
    "5 000-digit integer": b"9" * 5_000,
    "negative 5 000-digit integer": b"-" + b"9" * 5_000,
    "invalid UTF-8": b'{"body": "\xff\xfe", "sig": ""}',
    "lone surrogate": b'"\\ud800"',
    "NaN": b"NaN",
    "-Infinity": b"-Infinity",
    "float": b"1.5",
    "2**53": b"9007199254740992",
    "duplicate key": b'{"a": 1, "a": 1}',
}


def envelope_with(field: str, raw: bytes, kind: str = "report", sender: str = "d01", run: str = "r1") -> bytes:
    """A well-formed-looking envelope whose one field holds ``raw`` JSON text."""
    body = json.dumps({"run": run, "kind": kind, "round": 1, "sender": sender})[:-1]
    return b'{"body": ' + body.encode() + b', "' + field.encode() + b'": ' + raw + b'}, "sig": "00"}'


# ---- the decoders ----------------------------------------------------------------------


@pytest.mark.parametrize("name", VECTORS)
def test_parse_refuses_each_vector_with_canonical_error(name):
    with pytest.raises(CanonicalError):
        parse(VECTORS[name])
    with pytest.raises(Drop) as exc:
        decode(VECTORS[name])
    assert exc.value.reason == "malformed"
    with pytest.raises(Drop) as exc:  # the same value one level down in an envelope
        decode(envelope_with("acc_bp", VECTORS[name]))
    assert exc.value.reason == "malformed"


def test_parse_accepts_the_limits_and_keeps_escapes():
    assert parse(b"9007199254740991") == MAX_SAFE_INT and parse(b"-9007199254740991") == -MAX_SAFE_INT
    assert parse(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    with pytest.raises(CanonicalError):
        parse(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    # brackets and escaped quotes inside strings are not nesting
    assert parse(b'["' + b"[" * 100 + b'\\"' + b"{" * 100 + b'", "\\\\"]') == ["[" * 100 + '"' + "{" * 100, "\\"]
    # a surrogate pair is one non-BMP character, not a lone surrogate
    assert parse(b'"\\ud83d\\ude00"') == "\U0001f600"
    with pytest.raises(CanonicalError):
        parse(b'["\\ud83d\\ude00", {"k\\udc00": 1}]')  # a lone one in a key


def test_decode_refuses_too_large_first():
    with pytest.raises(Drop) as exc:
        decode(b"[" * 2_000_000)
    assert exc.value.reason == "too_large"


def _depth(v) -> int:
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    return 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-MAX_SAFE_INT, MAX_SAFE_INT) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
# JSON's own tokens (and near misses) reach much further into the parser than random bytes
TOKENS = [
    "[", "]", "{", "}", "[" * 10, "{\"a\":" * 10, '"', ":", ",", " ", '"k"', '"\\"', '\\"', "\\\\", "\\u",
    "\\ud800", "\\udc00", "\\ud83d\\ude00", "\U0001f600", "\ud800", "0", "-", "7", "-0", "9" * 17, "1.5",
    "1e3", "NaN", "Infinity", "true", "null", "fals", "\x00", "\n",
]  # fmt: skip
JSONISH = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join)
# JSON that json.dumps writes from values a signed body must not hold: huge integers, floats,
# lone surrogates (escaped or not), deep nesting
WILD_JSON = st.recursive(
    st.none() | st.integers() | st.integers(min_value=2**53 - 2, max_value=2**70) | st.floats()
    | st.text(st.characters(codec=None, categories=None), max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=40,
).flatmap(lambda v: st.booleans().map(lambda ascii: json.dumps(v, ensure_ascii=ascii)))
HOSTILE_BYTES = st.one_of(
    st.binary(max_size=300),
    JSONISH.map(lambda s: s.encode("utf-8", "surrogatepass")),
    WILD_JSON.map(lambda s: s.encode("utf-8", "surrogatepass")),
)


@settings(max_examples=400, deadline=None)
@given(HOSTILE_BYTES)
def test_parse_raises_only_canonical_error(data):
    try:
        value = parse(data)
    except CanonicalError:
        return
    # whatever it accepts, the encoder accepts too, and it is never nested too deep
    canonical_bytes(value)
    assert _depth(value) <= MAX_DEPTH


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_canonical_bytes_round_trip(value):
    assume(_depth(value) <= MAX_DEPTH)
    data = canonical_bytes(value)
    back = parse(data)
    assert back == value and canonical_bytes(back) == data
    assert back == json.loads(data)  # the RFC 8785 form of a valid value is plain JSON


@settings(max_examples=300, deadline=None)
@given(HOSTILE_BYTES)
def test_decode_raises_only_drop(data):
    try:
        decode(data)
    except Drop as exc:
        assert exc.reason in ("malformed", "too_large")


def mutations(payload: bytes):
    """Byte-level edits of a valid payload: flip, insert, delete, truncate, splice a vector."""
    n = len(payload)
    pos = st.integers(0, n - 1)
    return st.one_of(
        st.tuples(pos, st.integers(0, 255)).map(lambda a: payload[: a[0]] + bytes([a[1]]) + payload[a[0] + 1 :]),
        st.tuples(pos, st.binary(min_size=1, max_size=8)).map(lambda a: payload[: a[0]] + a[1] + payload[a[0] :]),
        st.tuples(pos, st.integers(1, 20)).map(lambda a: payload[: a[0]] + payload[a[0] + a[1] :]),
        pos.map(lambda i: payload[:i]),
        st.tuples(pos, st.sampled_from(list(VECTORS.values()))).map(lambda a: payload[: a[0]] + a[1][:2000] + payload[a[0] :]),
    )


# ---- an observed run -------------------------------------------------------------------


class FakeMqtt:
    def __init__(self):
        self.inbox: queue.Queue = queue.Queue()
        self.subscriptions: list[str] = []

    def subscribe(self, *topics: str) -> None:
        self.subscriptions += topics


@pytest.fixture(scope="module")
def net():
    """A finished 3-round run: 8 devices, d03 malicious; every message it published."""
    n = SimNet(n=8, roles=(4, 2, 2), rounds=3, malicious=("d03",))
    n.start()
    n.run()
    return n


def drain(obs: Observer) -> None:
    """Pump until the inbox is empty, one message a call, however long each takes."""
    while not obs.mqtt.inbox.empty():
        obs.pump(0)


def observer_of(net, feed=True) -> Observer:
    obs = Observer(FakeMqtt())
    obs.follow(net.genesis)
    if feed:
        for p in net.published:
            if p.topic.split("/")[3] in RUN_KINDS:
                obs._on(p.topic, p.payload)
    return obs


def valid_payloads(net) -> dict[str, tuple[str, bytes]]:
    """One genuine (topic, payload) per kind the observer reads, hello and status included."""
    out = {}
    for p in net.published:
        kind = p.topic.split("/")[3]
        if kind in RUN_KINDS:
            out.setdefault(kind, (p.topic, p.payload))
    key = net.keys["d01"]
    out["hello"] = (device_topic("d01", "hello"), signed_announcement(key, "d01", "hello"))
    out["status"] = (device_topic("d01", "status"), signed_announcement(key, "d01", "status", state="offline"))
    out["ack"] = (topic("r1", "ack", "d01"), sign(key, {"run": "r1", "kind": "ack", "round": 0, "sender": "d01", "cmd": "ab" * 32}).payload())
    return out


def signed_announcement(key: KeyPair, device: str, kind: str, state: str = "offline", pubkey: str | None = None) -> bytes:
    body = {"run": "devices", "kind": kind, "round": 0, "sender": device}
    if kind == "hello":
        body |= {"pubkey": pubkey or key.public_hex, "caps": ["train", "validate", "mine"], "time": 1}
    else:
        body["state"] = state
    return sign(key, body).payload()


def outcome(obs: Observer, net) -> tuple:
    """Everything the operator derives from what it observed, as comparable values."""
    honest = set(net.genesis.device_ids) - {"d03"}
    results = [obs.round_result(h, honest, 1.0) for h in range(1, 4)]
    chain = [b.id for b in obs.chain(3, honest)]
    stakes = obs.replay(3, honest).stakes
    return [r and r.as_json() for r in results], chain, stakes, sorted(obs.offline), sorted(obs.hellos)


def test_the_observed_simnet_run_is_complete(net):
    obs = observer_of(net)
    results, chain, stakes, offline, _ = outcome(obs, net)
    assert all(results) and len(chain) == 3 and not offline
    assert chain == [b.id for b in net.committed["d00"]]
    assert not obs.drops


@pytest.mark.parametrize("kind", RUN_KINDS + ANNOUNCEMENTS)
@pytest.mark.parametrize("name", VECTORS)
def test_each_vector_on_each_topic_is_dropped_as_malformed(net, kind, name):
    obs = observer_of(net)
    before = outcome(obs, net)
    tp = device_topic("d01", kind) if kind in ANNOUNCEMENTS else topic("r1", kind, "d01")
    for payload in (VECTORS[name], envelope_with("x", VECTORS[name], kind=kind)):
        obs.mqtt.inbox.put(Incoming(tp, payload))
    drain(obs)
    assert obs.drops == Counter({"malformed": 2})
    assert outcome(obs, net) == before


def test_pump_counts_a_bug_as_internal_error_and_goes_on(net, monkeypatch):
    obs = observer_of(net, feed=False)
    calls = []

    def boom(t, p):
        calls.append(t)
        raise RuntimeError("a bug")

    monkeypatch.setattr(obs, "_on", boom)
    for _ in range(3):
        obs.mqtt.inbox.put(Incoming("bfl/v1/r1/report/d01", b"{}"))
    drain(obs)
    assert obs.drops == Counter({"internal_error": 3}) and len(calls) == 3


# ---- validly signed bodies with junk fields (an admitted device gone wrong) -------------

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-MAX_SAFE_INT, MAX_SAFE_INT), st.text(max_size=70),
    st.sampled_from(["ab" * 32, "AB" * 32, "d01", "x" * 65, -5, 10_001, 1 << 40]),
    st.lists(st.integers(-3, 3) | st.text(max_size=5) | st.dictionaries(st.text(max_size=5), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers(-MAX_SAFE_INT, MAX_SAFE_INT) | st.text(max_size=4) | st.none(), max_size=3),
)  # fmt: skip


@pytest.mark.parametrize(
    "field,value",
    [("acc_bp", -5), ("acc_bp", "90"), ("acc_bp", 10_001), ("acc_bp", True), ("acc_bp", None), ("head", "x"),
     ("head", 7), ("stake", -1), ("stake", [1]), ("extra", {"train_ms": "slow"}), ("extra", []), ("drops", {"a": -1})],
)  # fmt: skip
def test_a_signed_report_with_a_junk_field_changes_nothing(net, field, value):
    obs = observer_of(net)
    before = outcome(obs, net)
    for p in net.published:
        if p.topic.split("/")[3] == "report":
            env = decode(p.payload)
            body = {**env.body, field: value}
            with pytest.raises(Drop) as exc:
                obs._on(p.topic, sign(net.keys[env.sender], body).payload())
            assert exc.value.reason == "malformed"
    assert outcome(obs, net) == before


def test_signed_reports_outside_the_run_rounds_are_dropped(net):
    obs = observer_of(net)
    key = net.keys["d01"]
    for rnd in (0, 4, MAX_SAFE_INT):
        body = {"run": "r1", "kind": "report", "round": rnd, "sender": "d01", "head": "ab" * 32, "acc_bp": 1, "stake": 0}
        with pytest.raises(Drop, match="wrong_round"):
            obs._on(topic("r1", "report", "d01"), sign(key, body).payload())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_signed_junk_fields_never_crash_the_operator(net, data):
    """A real device key signs a body of each kind with one or more fields replaced by junk
    (or deleted); the observer drops it or takes it, and what the operator computes from the
    run afterwards (round results, chain, stakes, summary, CSV rows) never raises."""
    obs = observer_of(net)
    genuine = valid_payloads(net)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(sorted(genuine)))
        tp, payload = genuine[kind]
        env = decode(payload)
        body = dict(env.body)
        for name in data.draw(st.lists(st.sampled_from(sorted(body) + ["extra", "drops"]), min_size=1, max_size=3)):
            if data.draw(st.booleans()):
                body[name] = data.draw(JUNK)
            else:
                body.pop(name, None)
        sender = body.get("sender")
        key = net.keys.get(sender, net.keys["d01"]) if isinstance(sender, str) else net.keys["d01"]
        try:
            payload = sign(key, body).payload()
        except CanonicalError:
            continue
        try:
            obs._on(tp, payload)
        except Drop:
            pass
    outcome(obs, net)
    summarize(obs, net)


def summarize(obs: Observer, net) -> dict:
    """Experiment.summary and csv_rows over what ``obs`` saw."""
    exp = Experiment(RunConfig(devices=8, roles=(4, 2, 2), rounds=3, run_id=net.genesis.run))
    exp.genesis, exp.observer, exp.malicious = net.genesis, obs, ["d03"]
    exp.spec, exp.broker_url = {"samples_per_device": 100, "test_per_device": 10}, "mqtt://test"
    honest = set(net.genesis.device_ids) - {"d03"}
    exp.results = [r for r in (obs.round_result(h, honest, 1.0) for h in range(1, 4)) if r is not None]
    summary = exp.summary()
    json.dumps(summary)
    exp.csv_rows("hostile", "test", 0)
    return summary


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_observer_on_arbitrary_topic_and_payload_raises_only_drop(net, data):
    obs = observer_of(net)
    genuine = valid_payloads(net)
    kind = data.draw(st.sampled_from(sorted(genuine)))
    tp, payload = genuine[kind]
    device = data.draw(st.sampled_from(["d01", "d03", "d07", "zz", "operator"]))
    tp = data.draw(
        st.sampled_from(
            [tp, device_topic(device, kind) if kind in ANNOUNCEMENTS else topic("r1", kind, device), topic("r2", "report", device)]
        )
        | st.text(max_size=40)
    )
    payload = data.draw(st.binary(max_size=200) | mutations(payload) | st.just(payload))
    try:
        obs._on(tp, payload)
    except Drop as exc:
        assert exc.reason != "internal_error"
    outcome(obs, net)


def test_summary_reports_the_operator_drops(net):
    obs = observer_of(net)
    obs.drops.update({"malformed": 3, "bad_signature": 2})
    clean = summarize(observer_of(net), net)
    summary = summarize(obs, net)
    assert summary["operator_drops"] == {"bad_signature": 2, "malformed": 3}
    assert len(summary["rounds"]) == 3
    assert {k: v for k, v in summary.items() if k != "operator_drops"} == {k: v for k, v in clean.items() if k != "operator_drops"}


# ---- forged announcements ----------------------------------------------------------------


def test_forged_hello_and_offline_for_an_admitted_device_are_dropped(net):
    """After the genesis: a hello and an 'offline' for d01, self-signed by an outsider's key,
    count as bad signatures and change neither hellos, offline nor admission."""
    obs = observer_of(net)
    mallory = KeyPair.generate()
    d01 = net.keys["d01"]
    obs._on(device_topic("d01", "hello"), signed_announcement(d01, "d01", "hello"))
    before = (dict(obs.hellos), set(obs.offline), dict(obs.admitted))
    for kind in ("hello", "status"):
        with pytest.raises(Drop) as exc:
            obs._on(device_topic("d01", kind), signed_announcement(mallory, "d01", kind))
        assert exc.value.reason == "bad_signature"
    # a hello signed by the device's key that announces another key is not taken either
    with pytest.raises(Drop, match="bad_claim"):
        obs._on(device_topic("d01", "hello"), signed_announcement(d01, "d01", "hello", pubkey=mallory.public_hex))
    # and a device outside the run is not listened to at all
    with pytest.raises(Drop, match="unknown_sender"):
        obs._on(device_topic("d99", "hello"), signed_announcement(mallory, "d99", "hello"))
    assert (obs.hellos, obs.offline, obs.admitted) == before
    # the genuine device's own 'offline' still counts
    obs._on(device_topic("d01", "status"), signed_announcement(d01, "d01", "status"))
    assert obs.offline == {"d01"}


def test_local_agents_are_admitted_before_their_hello(net):
    """`bfl run` without --external knows its agents' keys before starting them."""
    obs = Observer(FakeMqtt())
    obs.admit({d: k.public_hex for d, k in net.keys.items()})
    mallory = KeyPair.generate()
    with pytest.raises(Drop, match="bad_signature"):
        obs._on(device_topic("d02", "hello"), signed_announcement(mallory, "d02", "hello"))
    obs._on(device_topic("d02", "hello"), signed_announcement(net.keys["d02"], "d02", "hello"))
    with pytest.raises(Drop, match="bad_signature"):
        obs._on(device_topic("d02", "status"), signed_announcement(mallory, "d02", "status"))
    assert obs.hellos["d02"]["pubkey"] == net.keys["d02"].public_hex and not obs.offline


def test_external_hello_is_trusted_on_first_use_only():
    obs = Observer(FakeMqtt())
    first, second = KeyPair.generate(), KeyPair.generate()
    with pytest.raises(Drop, match="unknown_sender"):  # a status before any hello: nothing to check it with
        obs._on(device_topic("x1", "status"), signed_announcement(first, "x1", "status"))
    obs._on(device_topic("x1", "hello"), signed_announcement(first, "x1", "hello"))
    for kind in ("hello", "status"):
        with pytest.raises(Drop, match="bad_signature"):
            obs._on(device_topic("x1", kind), signed_announcement(second, "x1", kind))
    assert obs.hellos["x1"]["pubkey"] == first.public_hex and not obs.offline
    obs._on(device_topic("x1", "status"), signed_announcement(first, "x1", "status"))
    assert obs.offline == {"x1"}


@pytest.mark.parametrize("caps", ["train", ["train", "fly"], [1], {"train": 1}, None])
def test_a_hello_with_bad_caps_is_malformed(caps):
    """Caps that are no list of capabilities would stop make_genesis_body in --external mode."""
    key = KeyPair.generate()
    body = {"run": "devices", "kind": "hello", "round": 0, "sender": "x1", "pubkey": key.public_hex, "caps": caps}
    with pytest.raises(Drop, match="malformed"):
        Observer(FakeMqtt())._on(device_topic("x1", "hello"), sign(key, body).payload())


# ---- an operator that missed something --------------------------------------------------


def test_a_device_marked_offline_counts_again_once_it_speaks_in_the_run(net):
    """A status "offline" (a will the broker published while the device reconnected) does not
    keep a device that goes on signing run messages out of the round; a forged run message
    in its name does not bring it back."""
    obs = observer_of(net, feed=False)
    obs._on(device_topic("d01", "status"), signed_announcement(net.keys["d01"], "d01", "status"))
    assert obs.offline == {"d01"}
    mine = [p for p in net.published if p.topic.split("/")[3] in ("head", "report") and p.topic.endswith("/d01")]
    forged = sign(KeyPair.generate(), {**decode(mine[0].payload).body}).payload()
    with pytest.raises(Drop, match="bad_signature"):
        obs._on(mine[0].topic, forged)
    assert obs.offline == {"d01"}
    obs._on(mine[0].topic, mine[0].payload)
    assert not obs.offline


def test_the_operator_takes_a_block_it_missed_from_a_local_agents_chain(net, tmp_path, monkeypatch):
    """Every block message of round 2 lost on the way to the operator: the honest devices'
    reports name the block, and the operator reads it from a local agent's chain file (read
    only, while the agent may be appending); the chain it then replays is the devices'. With
    no such file it stops with a line naming the block, not an unexplained failure."""
    import orchestrator.experiment as ex
    from orchestrator.experiment import ExperimentError

    monkeypatch.setattr(ex, "MISSING_BLOCK_WAIT_S", 0.3)
    committed = net.committed["d00"]
    obs = observer_of(net, feed=False)
    for p in net.published:
        kind = p.topic.split("/")[3]
        if kind in RUN_KINDS and not (kind == "block" and decode(p.payload).round == 2):
            obs._on(p.topic, p.payload)
    exp = Experiment(RunConfig(devices=8, roles=(4, 2, 2), rounds=3, run_id=net.genesis.run, out=tmp_path))
    exp.genesis, exp.observer, exp.malicious = net.genesis, obs, ["d03"]
    honest = set(net.genesis.device_ids) - {"d03"}
    with pytest.raises(ExperimentError, match=f"round 2: the devices report block {committed[1].id[:12]}, which the operator never received"):
        exp._round_result(2, honest, 1.0)
    exp.agents = object()  # local agents: their chain files are under OUT/agents
    chain = tmp_path / "agents" / "d05" / "runs" / net.genesis.run / "chain.jsonl"
    chain.parent.mkdir(parents=True)
    chain.write_bytes(b"".join(b.payload() + b"\n" for b in committed) + b'{"torn')  # (an append in progress)
    res = exp._round_result(2, honest, 1.0)
    assert res.block_hash == committed[1].id and chain.read_bytes().endswith(b'{"torn')
    assert [b.id for b in obs.chain(3, honest)] == [b.id for b in committed]
