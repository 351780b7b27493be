"""`bfl verify OUT`: re-verify a finished run from its output folder alone.

Everything is re-derived from the files ``bfl run`` leaves behind, trusting none of the
numbers in them:

* ``OUT/genesis.json``: the operator's signature (the key is in the genesis body, or pinned
  with ``--operator``) and the body's consistency; G_0 = ``init_params(arch, init_seed)``;
* ``OUT/agents/<device>/runs/<run>/{genesis.json,chain.jsonl}`` (``edge_agent.store.ChainStore``):
  every agent's copy of the genesis and every stored block -- links (height and ``prev``),
  the miner's signature, every transaction's signature and role, the outcome recomputed from
  the votes, Eq. 1-3 rewards, stakes and blacklist (``ledger.process_block``);
* ``OUT/blobs`` (the consolidated content-addressed store, ``LocalAgents.consolidate_blobs``;
  an agent's own ``blobs/`` folder is read too if it is still there): every model the chain
  names is present and its bytes hash to its name, and each block's G_j is recomputed from
  the accepted updates by the devices' own rule (``aggregators.aggregate_for_genesis``);
* all agents hold one chain (a shorter one is a prefix of the longest), and ``summary.json``
  agrees with it (heads, stakes, blacklist).

Read-only: nothing under OUT is written. Each check yields one :class:`Check`; a file that
does not parse or a corrupt byte is a failed check, never an exception. :class:`NotARun` is
raised (before the first check) when OUT is not a run folder at all.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edge_agent.ml import blobs as bl
from edge_agent.ml.aggregators import aggregate_for_genesis
from edge_agent.ml.arch import init_params
from edge_agent.protocol.canonical import CanonicalError, canonical_bytes, parse
from edge_agent.protocol.crypto import verify as verify_sig
from edge_agent.protocol.genesis import Genesis, load_genesis
from edge_agent.protocol.messages import Drop, Envelope, from_json


class NotARun(Exception):
    """OUT is missing, not a folder, not a ``bfl run`` output or unreadable (one line)."""


class BlockError(Exception):
    """A stored block does not verify (one line: why)."""


@dataclass(frozen=True)
class Check:
    ok: bool
    text: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.text}"


def short(h: object) -> str:
    return f"{h[:12]}..." if isinstance(h, str) else repr(h)


# ---- the ledger ------------------------------------------------------------------------


def _apply(genesis: Genesis, state, block: Envelope):
    """The one place verify calls the ledger: the state after ``block`` on top of ``state``
    (None: the genesis' state) and the block's aggregation inputs [(hash, n_train)].

    Raises :class:`BlockError`. The miner's signature covers the whole body, so any altered
    byte of a block fails it first; the message then also names what else no longer holds:
    a transaction's own signature, or a field that differs from the recomputed outcome.
    """
    from edge_agent.protocol import ledger

    if state is None:
        state = ledger.genesis_state(genesis)
    try:
        nxt, outcome = ledger.process_block(genesis, state, block)
    except ledger.InvalidBlock as exc:
        why = str(exc)
        miner = block.body.get("sender")
        if exc.reason == "bad_signature" and exc.detail.startswith("block"):
            why = f"the signature of its miner {miner} does not verify"
            try:
                b = block.body
                txs = [from_json(raw) for raw in b["wtxs"] + b["vtxs"]]
                for tx in txs:
                    if not verify_sig(genesis.pubkey(tx.sender) or "", canonical_bytes(tx.body), tx.sig):
                        why += f"; the {tx.kind} of {tx.sender} in it is not signed by {tx.sender}"
                wtxs = [t for t in txs if t.kind == "wtx"]
                vtxs = [t for t in txs if t.kind == "vtx"]
                out = ledger.tally(genesis, state, miner, wtxs, vtxs)
                for key in ("accepted", "rejected", "rewards", "blacklisted"):
                    if b[key] != getattr(out, key):
                        why += f"; {key} differ from the recomputed value"
            except Exception:  # noqa: BLE001 -- a diagnosis only; the block fails anyway
                pass
        raise BlockError(why) from None
    return nxt, list(outcome.inputs)


# ---- reading the folder ----------------------------------------------------------------


class _Unreadable(Exception):
    pass


def _read_envelope(path: Path) -> Envelope:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Unreadable(f"{path.name} is missing") from None
    except OSError as exc:
        raise _Unreadable(f"cannot read {path.name}: {exc.strerror}") from None
    try:
        return from_json(parse(data))
    except CanonicalError as exc:
        raise _Unreadable(f"{path.name} is not canonical JSON: {exc}") from None
    except Drop as exc:
        raise _Unreadable(f"{path.name} is not a signed envelope: {exc}") from None


def _read_chain(path: Path) -> tuple[list[Envelope], str | None]:
    """The stored blocks up to the first line that does not parse, and why it did not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], f"no chain store ({path.name} is missing)"
    except OSError as exc:
        return [], f"cannot read {path.name}: {exc.strerror}"
    blocks: list[Envelope] = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, line in enumerate(lines, 1):
        try:
            blocks.append(from_json(parse(line)))
        except (CanonicalError, Drop) as exc:
            return blocks, f"line {i} of {path.name} is not a signed block envelope ({exc})"
    return blocks, None


class Blobs:
    """Read-only view of the run's content-addressed stores: OUT/blobs, and an agent's own
    ``blobs/`` folder if one is left (a run whose stores were not consolidated)."""

    def __init__(self, out: Path):
        self.out = out
        self.roots = [out / "blobs"] + sorted(p for p in out.glob("agents/*/blobs") if p.is_dir())
        self._problem: dict[str, str | None] = {}

    def _scan(self, h: str) -> bytes | None:
        """Read and hash every copy of blob ``h``; cache what is wrong (None: present and intact)
        and return the bytes of an intact copy, if any."""
        good, problem = None, None
        for root in self.roots:
            path = bl.blob_path(root, h)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                problem = problem or f"cannot be read ({path.relative_to(self.out)}: {exc.strerror})"
                continue
            got = bl.blob_hash(data)
            if got == h:
                good = data if good is None else good
            else:
                problem = problem or f"is corrupt: {path.relative_to(self.out)} hashes to {short(got)}, not to its name"
        if good is None and problem is None:
            problem = "is missing from blobs/"
        self._problem[h] = problem
        return good

    def read(self, h: str) -> bytes:
        """The bytes of blob ``h``; raises _Unreadable if no copy is intact."""
        data = self._scan(h)
        if data is None:
            raise _Unreadable(self._problem[h])
        return data

    def problem(self, h: str) -> str | None:
        """None if every copy of blob ``h`` is intact (and there is one), else what is wrong."""
        if h not in self._problem:
            self._scan(h)
        return self._problem[h]


# ---- the verifier ----------------------------------------------------------------------


@dataclass
class _BlockResult:
    height: int
    miner: str
    holders: list[str] = field(default_factory=list)
    error: str | None = None
    body: dict = field(default_factory=dict)
    prev_global: str = ""
    state: object = None  # the ledger's state after the block
    inputs: list = field(default_factory=list)


class Verifier:
    def __init__(self, out: Path, operator: str | None = None):
        self.out = Path(out)
        self.operator = operator
        self._check_folder()
        self.blobs = Blobs(self.out)

    def _check_folder(self) -> None:
        out = self.out
        try:
            if not out.exists():
                raise NotARun(f"{out}: no such folder")
            if not out.is_dir():
                raise NotARun(f"{out} is a file, not the output folder of `bfl run`")
            names = {p.name for p in out.iterdir()}
        except OSError as exc:
            raise NotARun(f"cannot read {out}: {exc.strerror}") from None
        if not {"summary.json", "genesis.json"} & names:
            raise NotARun(f"{out} has neither summary.json nor genesis.json: not the output folder of `bfl run`")

    def _check(self, ok: bool, text: str) -> Check:
        return Check(ok, text)

    def run(self) -> Iterator[Check]:
        try:
            yield from self._run()
        except Exception as exc:  # noqa: BLE001 -- a bug or an unforeseen file: a failed check, not a traceback
            yield self._check(False, f"verification stopped: {type(exc).__name__}: {exc}")

    # -- the checks, in output order --

    def _run(self) -> Iterator[Check]:
        summary = None
        try:
            summary = json.loads((self.out / "summary.json").read_text())
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            yield self._check(False, "summary.json is missing (the run did not finish)")
        except (OSError, ValueError) as exc:
            summary = None
            yield self._check(False, f"summary.json is unreadable: {exc}")

        genesis = None
        for check, g in self._genesis(summary):
            if check is not None:
                yield check
            genesis = g or genesis
        if genesis is None:
            yield self._check(False, "no valid genesis: the chains cannot be checked")
            return
        yield self._init_model(genesis)

        devices = self._devices(genesis)
        if not devices:
            yield self._check(False, "no device's chain store under agents/ (an --external run keeps them on the devices)")
            return
        results: dict[tuple, _BlockResult] = {}
        chains: dict[str, list[Envelope]] = {}
        finals: dict[str, object] = {}
        for dev in devices:
            yield from self._chain(genesis, dev, results, chains, finals)
        yield self._agreement(chains, summary)
        yield from self._blob_store(genesis, results)
        if summary is not None:
            yield self._summary(genesis, summary, chains, finals)

    def _run_dir(self, dev: str, run: str) -> Path:
        return self.out / "agents" / dev / "runs" / run

    def _genesis(self, summary: dict | None) -> Iterator[tuple[Check | None, Genesis | None]]:
        """OUT/genesis.json (the operator's copy); if it fails, the agents' copy, so that the
        chains can still be checked."""
        path = self.out / "genesis.json"
        genesis = None
        try:
            genesis = load_genesis(_read_envelope(path), self.operator)
        except _Unreadable as exc:
            yield self._check(False, f"genesis: {exc}"), None
        except Drop as exc:
            yield self._check(False, f"genesis.json: {_drop_text(exc)}"), None
        else:
            b = genesis.body
            yield self._check(
                True,
                f"genesis signature (operator {short(genesis.operator)}) and consistency: run {genesis.run}, "
                f"{len(genesis.device_ids)} devices, roles {b['roles']}, {genesis.rounds} rounds, "
                f"{genesis.protocol}, aggregator {genesis.hp.get('aggregator', 'fedavg')}, id {short(genesis.hash)}",
            ), genesis
        if summary is not None:
            run = genesis.run if genesis is not None else None
            if run is not None and summary.get("run_id") != run:
                yield self._check(False, f"summary.json is of run {summary.get('run_id')!r}, the genesis of {run}"), None
        if genesis is not None:
            return
        # fall back on the copies the agents hold (each verified the same way)
        found: Counter = Counter()
        envs = {}
        for p in sorted(self.out.glob("agents/*/runs/*/genesis.json")):
            try:
                g = load_genesis(_read_envelope(p), self.operator)
            except (_Unreadable, Drop):
                continue
            found[(g.hash, g.env.sig)] += 1
            envs[(g.hash, g.env.sig)] = g
        if found:
            key, n = found.most_common(1)[0]
            g = envs[key]
            yield self._check(
                True,
                f"genesis: the copy {n} agent(s) hold is signed by operator {short(g.operator)} and consistent "
                f"(run {g.run}, id {short(g.hash)}); the chains are checked against it",
            ), g

    def _init_model(self, genesis: Genesis) -> Check:
        model = genesis.body["model"]
        try:
            h = bl.blob_hash(bl.encode(init_params(model["arch"], model["init_seed"])))
        except (KeyError, TypeError, ValueError) as exc:
            return self._check(False, f"G_0: cannot derive init_params from the genesis' model {model!r}: {exc}")
        if h != genesis.init_model:
            return self._check(
                False,
                f"G_0: the genesis' model.init {short(genesis.init_model)} is not init_params({model['arch']}, "
                f"seed {model['init_seed']}) = {short(h)}",
            )
        return self._check(True, f"G_0 = init_params({model['arch']}, seed {model['init_seed']}) = model.init {short(h)}")

    def _devices(self, genesis: Genesis) -> list[str]:
        """The genesis' devices, and any other folder under agents/ holding this run."""
        devs = set(genesis.device_ids)
        agents = self.out / "agents"
        if agents.is_dir():
            devs |= {p.parent.parent.name for p in agents.glob(f"*/runs/{genesis.run}")}
        else:
            return []
        return sorted(devs)

    def _chain(
        self,
        genesis: Genesis,
        dev: str,
        results: dict[tuple, _BlockResult],
        chains: dict[str, list[Envelope]],
        finals: dict[str, object],
    ) -> Iterator[Check]:
        """Verify ``dev``'s stored chain block by block; yield a line for each block not seen
        in an earlier chain, then one for the chain."""
        d = self._run_dir(dev, genesis.run)
        problems = []
        if dev not in genesis.devices:
            problems.append("not a device of the genesis")
        try:
            env = _read_envelope(d / "genesis.json")
            if (env.id, env.sig) != (genesis.hash, genesis.env.sig):
                problems.append(f"its genesis.json is not the run's genesis (id {short(env.id)})")
        except _Unreadable as exc:
            problems.append(f"genesis: {exc}")
        blocks, unparsed = _read_chain(d / "chain.jsonl")
        chains[dev] = blocks
        state = None
        prev_id, valid = genesis.hash, 0
        for i, blk in enumerate(blocks, 1):
            key = (blk.id, blk.sig, prev_id)
            res = results.get(key)
            new = res is None
            if new:
                res = results[key] = self._block(genesis, state, prev_id, i, blk)
            res.holders.append(dev)
            if new:
                yield from self._block_lines(genesis, i, blk, res, dev)
            if res.error is not None:
                if not new:
                    yield self._check(False, f"block {i} ({dev}'s chain): {res.error}")
                problems.append(f"block {i} of {len(blocks)} does not verify")
                break
            state, prev_id, valid = res.state, blk.id, i
        if unparsed:
            if valid == len(blocks):
                yield self._check(False, f"block {len(blocks) + 1} ({dev}'s chain): {unparsed}")
            problems.append(f"block {len(blocks) + 1}: unreadable")
        finals[dev] = state
        where = f"height {len(blocks)}, head {short(blocks[-1].id if blocks else genesis.hash)}"
        if problems:
            yield self._check(False, f"{dev} chain: {'; '.join(problems)} (valid up to height {valid}; stored {where})")
        else:
            yield self._check(True, f"{dev} chain: genesis copy, {len(blocks)} blocks, links and signatures; {where}")

    def _block(self, genesis: Genesis, state, prev_id: str, height: int, blk: Envelope) -> _BlockResult:
        b = blk.body
        res = _BlockResult(height, str(b.get("sender")), body=b)
        res.prev_global = genesis.init_model if state is None else state.global_model
        if b.get("height") != height:
            res.error = f"its height is {b.get('height')!r}, expected {height}"
        elif b.get("prev") != prev_id:
            res.error = f"prev {short(b.get('prev'))} is not the id of block {height - 1} ({short(prev_id)})"
        else:
            try:
                res.state, res.inputs = _apply(genesis, state, blk)
            except BlockError as exc:
                res.error = str(exc)
        return res

    def _block_lines(self, genesis: Genesis, height: int, blk: Envelope, res: _BlockResult, dev: str) -> Iterator[Check]:
        if res.error is not None:
            yield self._check(False, f"block {height} ({dev}'s chain): {res.error}")
            return
        b = blk.body
        yield self._check(
            True,
            f"block {height} (miner {res.miner}, id {short(blk.id)}): signatures of the block and its "
            f"{len(b['wtxs'])} + {len(b['vtxs'])} transactions, roles, votes -> accepted [{','.join(b['accepted'])}] "
            f"rejected [{','.join(b['rejected'])}], rewards, stakes, blacklist [{','.join(sorted(res.state.blacklist))}]",
        )
        yield self._global_model(genesis, height, blk, res)

    def _global_model(self, genesis: Genesis, height: int, blk: Envelope, res: _BlockResult) -> Check:
        b = blk.body
        prev_global = res.prev_global
        owners: dict[str, list[str]] = {}
        for raw in b["wtxs"]:
            owners.setdefault(raw["body"]["model"], []).append(raw["body"]["sender"])
        rule = genesis.hp.get("aggregator", "fedavg")
        updates = []
        for h, n in res.inputs:
            try:
                updates.append((self.blobs.read(h), n))
            except _Unreadable as exc:
                who = ",".join(owners.get(h, ["?"]))
                return self._check(False, f"block {height}: G_{height} cannot be recomputed: the update of {who} (blob {short(h)}) {exc}")
        notes: list[str] = []
        try:
            g = aggregate_for_genesis(genesis.hp, genesis.arch, updates, notes.append)
        except ValueError as exc:
            return self._check(False, f"block {height}: G_{height} cannot be recomputed: {exc}")
        expected = prev_global if g is None else bl.blob_hash(bl.encode(g))
        how = f"{rule} of {len(updates)} accepted update(s)" if g is not None else f"G_{height - 1} (no usable update)"
        extra = f" ({'; '.join(notes)})" if notes else ""
        if expected != b["global_model"]:
            return self._check(
                False, f"block {height}: G_{height} {short(b['global_model'])} is not the recomputed {how} = {short(expected)}{extra}"
            )
        return self._check(True, f"block {height}: G_{height} {short(expected)} = {how}, recomputed from the blobs{extra}")

    def _agreement(self, chains: dict[str, list[Envelope]], summary: dict | None) -> Check:
        """One chain: every device's stored chain is a prefix of the longest (by block ids)."""
        ids = {d: [b.id for b in blks] for d, blks in chains.items()}
        longest = max(ids.values(), key=len)
        off = sorted(d for d, c in ids.items() if c != longest[: len(c)])
        mal = sorted(set((summary or {}).get("malicious") or []) & set(ids))
        with_mal = f" (malicious {', '.join(mal)} included)" if mal else ""

        def where(d: str) -> str:
            c = ids[d]
            return f"{d} at {len(c)} {short(c[-1]) if c else '(genesis)'}"

        def fork(d: str) -> str:
            c = ids[d]
            j = next(i for i, (x, y) in enumerate(zip(c, longest)) if x != y)
            return f"{d}'s block {j + 1} is {short(c[j])}, not {short(longest[j])}"

        head = short(longest[-1]) if longest else "(genesis)"
        if off:
            return self._check(
                False,
                f"chains disagree with the longest (height {len(longest)}, head {head}): " + "; ".join(fork(d) for d in off),
            )
        behind = [where(d) for d in sorted(ids) if len(ids[d]) < len(longest)]
        if behind:
            return self._check(
                True, f"chains agree: one chain, height {len(longest)}, head {head}; behind on it: {'; '.join(behind)}{with_mal}"
            )
        return self._check(True, f"chains agree: all {len(ids)} devices at height {len(longest)}, head {head}{with_mal}")

    def _blob_store(self, genesis: Genesis, results: dict[tuple, _BlockResult]) -> Iterator[Check]:
        """Every model the verified blocks need (each accepted update, G_j) and G_0 is present,
        its bytes hashing to its name; an update that was not accepted may be absent (its
        worker may never have published it: that is why it was voted down), but a copy that
        is present must match its name."""
        named: dict[str, str] = {genesis.init_model: "G_0"}
        needed = {genesis.init_model}  # G_0, every G_j and every accepted update
        for (_, _, _), res in sorted(results.items(), key=lambda kv: kv[1].height):
            if res.error is not None:
                continue
            b = res.body
            for raw in b["wtxs"]:
                h, who = raw["body"]["model"], raw["body"]["sender"]
                named.setdefault(h, f"update of {who} in block {res.height}")
                if who in b["accepted"]:
                    needed.add(h)
            named.setdefault(b["global_model"], f"G_{res.height}")
            needed.add(b["global_model"])
        bad = [(h, what, self.blobs.problem(h)) for h, what in named.items()]
        absent = [h for h, _, why in bad if h not in needed and why == "is missing from blobs/"]
        bad = [x for x in bad if x[2] is not None and x[0] not in absent]
        if absent:
            yield self._check(True, f"blobs: {len(absent)} update(s) voted down and never published or fetched are not in blobs/")
        for h, what, why in bad[:10]:
            yield self._check(False, f"blob {short(h)} ({what}) {why}")
        if len(bad) > 10:
            yield self._check(False, f"... and {len(bad) - 10} more blobs missing or corrupt")
        if not bad:
            yield self._check(True, f"blobs: the {len(named) - len(absent)} models the chain needs are in blobs/, each matching its SHA-256")

    def _summary(self, genesis: Genesis, summary: dict, chains: dict[str, list[Envelope]], finals: dict[str, object]) -> Check:
        """summary.json's heads, stakes and blacklist are those of the verified chains."""
        diffs = []
        heads = summary.get("heads")
        if isinstance(heads, dict):
            for d, h in sorted(heads.items()):
                stored = chains.get(d)
                if h is not None and stored is not None and (stored[-1].id if stored else genesis.hash) != h:
                    diffs.append(f"head of {d} {short(h)} is not its stored head")
        else:
            diffs.append("no heads")
        states = [s for s in finals.values() if s is not None]
        top = max(states, key=lambda s: s.height) if states else None
        rounds = summary.get("rounds")
        if top is None:
            diffs.append("no verified block to compare with")
        else:
            if isinstance(rounds, list) and len(rounds) != top.height:
                diffs.append(f"{len(rounds)} rounds, the longest verified chain {top.height} blocks")
            stakes = {d: top.stake(d) for d in genesis.device_ids}
            if summary.get("stakes") != stakes:
                diffs.append(f"stakes {summary.get('stakes')} differ from the recomputed {stakes}")
            if summary.get("blacklist") != sorted(top.blacklist):
                diffs.append(f"blacklist {summary.get('blacklist')} differs from the recomputed {sorted(top.blacklist)}")
        if diffs:
            return self._check(False, "summary.json: " + "; ".join(diffs))
        return self._check(
            True,
            f"summary.json agrees with the chain: heads, stakes ({', '.join(f'{d} {s}' for d, s in sorted(stakes.items()))}), "
            f"blacklist [{','.join(sorted(top.blacklist))}]",
        )


def _drop_text(exc: Drop) -> str:
    if exc.reason == "bad_signature":
        return "the operator's signature does not verify"
    if exc.reason == "unknown_operator":
        return "signed by another operator than --operator"
    return f"inconsistent ({exc.reason}: {exc.detail})"


def verify_run(out: Path, operator: str | None = None) -> Iterator[Check]:
    """Yield the checks of run folder ``out`` as they are made; raises NotARun first if it is not one."""
    return Verifier(out, operator).run()
