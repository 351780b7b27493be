"""Byzantine insiders in live runs: real agents over the embedded broker, each insider a
device with its own valid key whose agent shell misbehaves on the wire
(edge_agent/byzantine.py). Every honest device ends on one head, ``bfl verify`` re-derives
the run from disk, and an equivocator is slashed."""

from __future__ import annotations

from edge_agent.protocol import ledger
from edge_agent.protocol.messages import from_json

from test_e2e import bfl
from test_e2e_variants import run_tiny

INSIDERS = ["--devices", "8", "--roles", "3,2,2", "--rounds", "4"]


def _roles_by_round(genesis, chain):
    state = ledger.genesis_state(genesis)
    out = []
    for blk in chain:
        out.append(ledger.roles_for(genesis, state))
        state, _ = ledger.process_block(genesis, state, blk)
    return out


def test_insiders_that_equivocate_claim_false_heads_and_inflate_votes(tmp_path):
    out, summary, genesis, chain, honest = run_tiny(
        tmp_path, *INSIDERS, "--malicious-ids", "d00=equivocate,d01=false_head,d02=junk_votes"
    )
    assert summary["attacks"] == {"d00": "equivocate", "d01": "false_head", "d02": "junk_votes"}
    assert len(chain) == 4
    state = ledger.replay(genesis, chain)
    roles = _roles_by_round(genesis, chain)
    # d00 signs two messages for every slot it fills: once a block carries the evidence it is
    # slashed and blacklisted. It has a role in a round before the last in all but (1/8)^3 runs.
    if any("d00" in r.workers + r.validators + r.miners for r in roles[:-1]):
        assert "d00" in state.slashed and state.stake("d00") == 0 and "d00" in state.blacklist
        assert any(e["a"]["body"]["sender"] == "d00" for b in chain for e in b.body["evidence"])
    # d02's inflated and ghost-vote transactions never entered a block: a validator earns at
    # most |W| verifications + |W| votes a round (Eq. 2)
    w = genesis.roles[0]
    for blk, r in zip(chain, roles):
        for raw in blk.body["vtxs"]:
            vtx = from_json(raw)
            assert len(vtx.body["verified"]) <= 2 * w and blk.body["rewards"].get(vtx.sender, 0) <= 4 * w
    # anyone can audit the run from disk alone
    proc = bfl("verify", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_insiders_that_withhold_their_update_and_spam_blobs(tmp_path):
    out, summary, genesis, chain, honest = run_tiny(
        tmp_path, *INSIDERS, "--malicious-ids", "d00=withhold_blob,d01=blob_spam"
    )
    assert len(chain) == 4
    for blk in chain:  # an update nobody could fetch is never accepted
        assert "d00" not in blk.body["accepted"]
    assert any("d00" in blk.body["rejected"] for blk in chain) or not any(
        raw["body"]["sender"] == "d00" for blk in chain for raw in blk.body["wtxs"]
    )
    # the spam (blobs nothing names) was never stored: the run's blob store holds only what
    # the chain names, G_0, and the updates of worker txs that missed their block
    named = {genesis.init_model} | {h for b in chain for h in (raw["body"]["model"] for raw in b.body["wtxs"])}
    named |= {b.body["global_model"] for b in chain}
    stored = {p.stem for p in (out / "blobs").glob("*/*.safetensors")}
    assert len(stored - named) <= genesis.roles[0] * len(chain)
    proc = bfl("verify", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
