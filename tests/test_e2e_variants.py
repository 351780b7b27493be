"""End to end on small settings: the baselines (vanilla FL, pFedMe), robust aggregation,
and each attack, over the orchestrator's embedded broker with real agents."""

from __future__ import annotations

import json

from edge_agent.ml import blobs as bl
from edge_agent.ml.aggregators import aggregate
from edge_agent.protocol import ledger, voting
from edge_agent.protocol.messages import from_json
from edge_agent.store import block_blobs

from test_e2e import assert_every_malicious_worker_rejected, bfl, load_chain

TINY = [
    "--devices", "6", "--rounds", "2", "--model", "mlp", "--dataset", "fashion-mnist",
    "--partition", "iid", "--samples-per-device", "200", "--local-epochs", "2",
    "--deadlines", "120,60,60", "--quiet",
]  # fmt: skip


# Roles follow block hashes (not --seed). Tests that need a malicious worker run 3 rounds of
# 4 workers among 6 devices with 2 malicious: P(no malicious worker at all) = (1/15)^3.
def run_tiny(tmp_path, *args, env: dict | None = None):
    out = tmp_path / "out"
    proc = bfl("run", *TINY, "--out", str(out), *args, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    honest = sorted(set(summary["heads"]) - set(summary["malicious"]))
    assert len({summary["heads"][d] for d in honest}) == 1
    genesis, chain = load_chain(out, honest[0], summary["run_id"])
    return out, summary, genesis, chain, honest


def test_vanilla_with_multi_krum_averages_everything_robustly(tmp_path):
    out, summary, genesis, chain, honest = run_tiny(
        tmp_path, "--protocol", "vanilla", "--roles", "3,2,1", "--malicious", "1", "--aggregator", "multi_krum"
    )
    assert summary["protocol"] == "vanilla"
    store = bl.BlobStore(out / "blobs")  # the agents' stores, consolidated by bfl run
    for blk in chain:
        assert blk.body["accepted"] == genesis.device_ids and blk.body["vtxs"] == []  # no validation
        updates = [(store.get_params(h, "mlp"), n) for h, n in ledger.aggregation_inputs(blk.body)]
        g, selected = aggregate("multi_krum", updates, n_malicious=1)
        assert bl.blob_hash(bl.encode(g)) == blk.body["global_model"]
        mal_index = [w["body"]["sender"] for w in blk.body["wtxs"]].index(summary["malicious"][0])
        assert mal_index not in selected  # Multi-Krum left the noise out


def test_pfedme_runs_and_reports_personalized_accuracy(tmp_path):
    out, summary, genesis, chain, honest = run_tiny(tmp_path, "--protocol", "pfedme", "--roles", "3,2,1")
    assert genesis.hp["pfedme"]["lam"] == 15 and genesis.hp["pfedme"]["k"] == 5
    assert all(blk.body["accepted"] == genesis.device_ids for blk in chain)
    assert summary["rounds"][-1]["accuracy"] > 20  # personalized models learn on IID data


def assert_votes_follow_algorithm_1(genesis, chain):
    """Every vote on the chain is what Algorithm 1 (median reference) plus the loss guard
    gives for the accuracies and losses the validator recorded with it."""
    hp = genesis.hp
    for blk in chain:
        for vtx in blk.body["vtxs"]:
            votes = vtx["body"]["votes"]
            if not votes:
                continue
            ref = voting.median_bp([v["local_bp"] for v in votes])
            med_loss = voting.lower_median([v["loss_milli"] for v in votes])
            for v in votes:
                assert v["ref_bp"] == ref
                expect = voting.vote(ref, v["local_bp"], hp["vh_bp"]) and voting.loss_guard_ok(
                    v["loss_milli"], med_loss, hp["loss_guard"]
                )
                assert v["positive"] == expect, (blk.body["height"], v)


def test_label_flipping_is_voted_out(tmp_path):
    """Measured over 8 rounds (IID, MLP): a label-flipped update scores 3-26 % where the
    round's reference scores 35-57 %, so it loses far more than vh in every round."""
    out, summary, genesis, chain, honest = run_tiny(
        tmp_path, "--rounds", "3", "--roles", "4,1,1", "--malicious", "2", "--attack", "label_flip"
    )
    assert_every_malicious_worker_rejected(summary)
    assert_votes_follow_algorithm_1(genesis, chain)


# Rounds in which G_{j-1} is still far from trained: there a negated update is far worse than
# an honest one. Measured (IID, MLP, 200 samples, 2 epochs): rounds 1-2, sign-flipped 0.2-15 %
# against a reference of 30-47 %. From round 3 on, one round's gain nears vh and a flipped
# update can pass the vote (it did in 2 of 6 runs); docs/results.md has the numbers.
EARLY_ROUNDS = 2


def test_sign_flipping_is_voted_out_while_it_hurts(tmp_path):
    """8 devices, 6 of them workers, 2 malicious: P(no malicious worker in 2 rounds) = (1/28)^2."""
    out, summary, genesis, chain, honest = run_tiny(
        tmp_path, "--devices", "8", "--rounds", str(EARLY_ROUNDS), "--roles", "6,1,1",
        "--malicious", "2", "--attack", "sign_flip",
    )  # fmt: skip
    assert_every_malicious_worker_rejected(summary)
    assert_votes_follow_algorithm_1(genesis, chain)


def test_scaling_attack_multiplies_the_update(tmp_path):
    """The update of a scaling attacker is G_{j-1} + 10 (L - G_{j-1}). Measured: in early
    rounds such an update can pass the accuracy vote (it may even be accurate), so this test
    checks the attack's effect, not its rejection."""
    import numpy as np

    out, summary, genesis, chain, honest = run_tiny(tmp_path, "--rounds", "3", "--roles", "4,1,1", "--malicious", "2", "--attack", "scale")
    mal = set(summary["malicious"])
    store = bl.BlobStore(out / "blobs")  # the agents' stores, consolidated by bfl run
    base_hash = genesis.init_model
    seen = 0
    for blk in chain:
        base = store.get_params(base_hash, "mlp")
        norms = {}
        for w in blk.body["wtxs"]:
            p = store.get_params(w["body"]["model"], "mlp")
            norms[w["body"]["sender"]] = float(np.sqrt(sum(np.sum((p[k] - base[k]) ** 2) for k in p)))
        bad = [norms[d] for d in norms if d in mal]
        good = [norms[d] for d in norms if d not in mal]
        if bad:
            seen += 1
            assert min(bad) > 5 * max(good)
        base_hash = blk.body["global_model"]
    assert seen >= 1, "no malicious worker in any round"


def test_per_device_attacks_lazy_and_sign_flip(tmp_path):
    """Two malicious devices with different attacks: d00 is lazy (resubmits G_{j-1} without
    training), d01 flips the sign of its update."""
    out, summary, genesis, chain, honest = run_tiny(
        tmp_path, "--rounds", "3", "--roles", "4,1,1", "--malicious-ids", "d00=lazy,d01=sign_flip"
    )
    assert summary["attacks"] == {"d00": "lazy", "d01": "sign_flip"}
    assert "'name': 'lazy'" in (out / "agents" / "d00" / "agent.log").read_text()
    assert "'name': 'sign_flip'" in (out / "agents" / "d01" / "agent.log").read_text()
    prev_global = genesis.init_model
    seen = 0
    for blk in chain:
        for w in blk.body["wtxs"]:
            if w["body"]["sender"] == "d00":
                seen += 1
                assert w["body"]["model"] == prev_global  # skipped training, resubmitted G_{j-1}
            if w["body"]["sender"] == "d01" and blk.body["height"] <= EARLY_ROUNDS:
                seen += 1
                assert "d01" in blk.body["rejected"]
        prev_global = blk.body["global_model"]
    assert seen >= 1
    assert_votes_follow_algorithm_1(genesis, chain)


def test_agents_keeping_one_round_of_blobs_still_agree(tmp_path):
    """BFL_KEEP_ROUNDS=1 (bfl-agent --keep-rounds 1): every agent deletes, after each block,
    the blobs that only older blocks name. The run still agrees on every block (d00 is lazy:
    when it trains, its update is G_{j-1}, named by two blocks); what the agents kept and
    bfl run consolidated is exactly what the last block names, plus blobs no block names."""
    out, summary, genesis, chain, honest = run_tiny(
        tmp_path, "--rounds", "3", "--roles", "4,1,1", "--malicious-ids", "d00=lazy", env={"BFL_KEEP_ROUNDS": "1"}
    )
    assert len(chain) == 3 and all(summary["heads"][d] == chain[-1].id for d in honest)
    named = [{genesis.init_model}] + [block_blobs(b.body) for b in chain]
    kept = {p.stem for p in (out / "blobs").glob("*/*.safetensors")}
    assert named[-1] <= kept
    assert not (set().union(*named[:-1]) - named[-1]) & kept


def test_malicious_validator_inverts_its_votes(tmp_path):
    """7 devices, 5 of them validators each round, 2 malicious: every round has an honest
    validator, and P(no malicious validator in 3 rounds) = (1/21)^3. (Roles 2,3,1 among 6 with
    3 malicious left only malicious validators in both rounds of one CI run: p = 1/400.)"""
    out, summary, genesis, chain, honest = run_tiny(
        tmp_path, "--devices", "7", "--rounds", "3", "--roles", "1,5,1", "--malicious", "2", "--attack", "invert_votes"
    )  # fmt: skip
    mal = set(summary["malicious"])
    checked = {True: 0, False: 0}
    for blk in chain:
        vtxs = [from_json(raw) for raw in blk.body["vtxs"]]
        # every recorded vote follows from the evaluation it records: the liar lies about both
        assert all(ledger.votes_follow_from_evaluation(genesis, v.body["votes"]) for v in vtxs)
        honest_votes: dict[str, set] = {}
        for vtx in vtxs:
            if vtx.sender not in mal:
                for v in vtx.body["votes"]:
                    honest_votes.setdefault(v["wtx"], set()).add(v["positive"])
        for vtx in vtxs:
            for v in vtx.body["votes"]:
                agreed = honest_votes.get(v["wtx"], set())
                if len(agreed) == 1:  # the honest validators were unanimous
                    inverted = vtx.sender in mal
                    assert v["positive"] == (not next(iter(agreed)) if inverted else next(iter(agreed)))
                    checked[inverted] += 1
    assert checked[True] >= 1 and checked[False] >= 1


def test_a_run_with_lenet5(tmp_path):
    """--model lenet5, an architecture that is only a file of edge_agent/ml/models/ (and its
    exported graph): workers train it with torch, validators score it with ONNX Runtime,
    and the run ends with a LeNet-5 global model whose accuracy the devices report."""
    # (the last --model wins; LeNet-5 with ReLU barely moves in 2 x 2 epochs of 200 images at
    # the default lr 0.01: 0.1 gets it to about 30 % in a round)
    out, summary, genesis, chain, honest = run_tiny(tmp_path, "--roles", "3,2,1", "--model", "lenet5", "--lr", "0.1")
    assert summary["config"]["model"] == "lenet5" and genesis.arch == "lenet5" and len(chain) == 2
    final = summary["final_model"]
    assert final["arch"] == "lenet5" and final["hash"] == chain[-1].body["global_model"]
    g = bl.BlobStore(out / "blobs").get_params(final["hash"], "lenet5")
    assert g is not None and g["conv2.weight"].shape == (16, 6, 5, 5)
    for blk in chain:  # every update was scored by the validators and the round's model averaged
        assert blk.body["accepted"] and len(blk.body["vtxs"]) == 2
    accuracies = [r["accuracy"] for r in summary["rounds"]]
    assert len(accuracies) == 2 and 20 < accuracies[-1] <= 100, accuracies
