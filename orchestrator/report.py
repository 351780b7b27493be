"""Results report: Markdown tables and figures from the experiment runner's CSV files.

The runner appends one row per round per run to ``OUT/rounds.csv`` and one row per device per
round to ``OUT/stakes.csv``. :func:`build_report` reads both (stdlib ``csv``) and writes into OUT:

- ``table.md``     the paper's Table 4 layout (rows: device setting; columns: VFL, pFedMe,
                   PoS-BFL[, FedAvg (clean)]; final-round accuracy mean ± std over repeats), plus
                   the mean over the last 3 rounds; for fig6/fig7 rows are malicious counts, for
                   fig8/custom rows are settings. Notes list whatever was skipped and why.
- ``accuracy.png`` accuracy vs round, mean over repeats with a min-max band; curves that
                   coincide (COINCIDE_FRACTION) get interleaved dashes, staggered markers and a
                   "coincides with" legend entry instead of hiding each other.
- ``stakes.png``   stake vs round of one representative PoS-BFL run: the honest devices as a
                   min-max band with their median, each malicious device as its own line.
- ``votes.png``    positive/negative votes per round of the PoS-BFL runs (up to 4 settings).

When the selection holds several experiments, table.md has one section each and the figures
are written per experiment as ``accuracy_<experiment>.png`` (etc.).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch),
so this works headless and does not disturb other users of matplotlib in the process.
"""

from __future__ import annotations

import csv
import math
import os
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROUNDS_CSV = "rounds.csv"
STAKES_CSV = "stakes.csv"
TABLE_MD = "table.md"

# protocol id -> column name, in the paper's column order
PROTOCOL_NAMES = {"vanilla": "VFL", "pfedme": "pFedMe", "pos-bfl": "PoS-BFL", "fedavg-clean": "FedAvg (clean)"}
TABLE4_PROTOCOLS = ("vanilla", "pfedme", "pos-bfl")  # always shown in Table 4, n/a when missing
PROTOCOL_COLORS = {"pos-bfl": "tab:blue", "vanilla": "tab:red", "pfedme": "tab:green", "fedavg-clean": "tab:orange"}
SPARE_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
LINESTYLES = ("-", "--", ":", "-.")
EXPERIMENT_ORDER = ("table4", "fig6", "fig7", "fig8", "custom")
EXPERIMENT_TITLES = {
    "table4": "Table 4: comparison of FL strategies per device setting",
    "fig6": "Fig. 6: accuracy vs number of malicious devices",
    "fig7": "Fig. 7: accuracy vs number of malicious devices",
    "fig8": "Fig. 8: effectiveness of the validation mechanism",
    "custom": "Custom experiment",
}
EXPERIMENT_SHORT = {"table4": "Table 4", "fig6": "Fig. 6", "fig7": "Fig. 7", "fig8": "Fig. 8", "custom": "Custom"}
BY_MALICIOUS = ("fig6", "fig7")  # experiments whose rows / lines are malicious-device counts

ROUND_KEYS = ("experiment", "setting", "protocol", "malicious", "repeat", "round", "accuracy")
STAKE_KEYS = ("experiment", "setting", "protocol", "malicious", "repeat", "round", "device", "stake")
ROUND_INTS = ("accepted", "rejected", "malicious_workers", "malicious_accepted", "votes_positive", "votes_negative")

#: Two curves "coincide" when, at every round of the shorter one, the other has a value too and the
#: two differ by at most this fraction of the y-axis span (1 percentage point of accuracy on the
#: 0-100 % axis). At FIGSIZE and DPI the axes are about 430 px tall, so that is at most 4 px between
#: the centres of two 3 px wide lines: drawn plainly, the later curve hides all or most of the
#: earlier one. Coinciding curves are drawn with interleaved dashes and distinct, staggered
#: markers, their legend entries say which curves they coincide with, and table.md notes it.
COINCIDE_FRACTION = 0.01
COINCIDE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: the malicious devices' lines on the stakes plot (never blue: the honest band is blue)
MALICIOUS_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "black",
                    "tab:gray", "tab:cyan", "tab:green")
HONEST_COLOR = "tab:blue"

FIGSIZE = (8, 5)
WIDE_FIGSIZE = (11, 5.5)
DPI = 120
RC = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 12,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


class ReportError(Exception):
    """A one-line, actionable reason why no report can be built."""


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class Run:
    """One run of one condition: its per-round rows (``rounds.csv``) or stakes (``stakes.csv``)."""

    experiment: str
    setting: str
    protocol: str
    malicious: int
    repeat: int
    run_id: str
    order: int  # position of its first row in the file
    rounds: dict[int, dict] = field(default_factory=dict)  # round -> parsed row
    stakes: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))  # device -> round -> stake
    malicious_devices: set[str] = field(default_factory=set)

    @property
    def cond(self) -> tuple[str, str, int]:
        return (self.setting, self.protocol, self.malicious)

    def accuracies(self) -> list[tuple[int, float]]:
        """(round, accuracy) in round order, rounds without a finite accuracy left out."""
        return [(r, row["accuracy"]) for r, row in sorted(self.rounds.items()) if row["accuracy"] is not None]

    def final(self) -> tuple[int, float] | None:
        acc = self.accuracies()
        return acc[-1] if acc else None

    def last_mean(self, k: int = 3) -> float | None:
        acc = [a for _, a in self.accuracies()[-k:]]
        return math.fsum(acc) / len(acc) if acc else None


def _int(text) -> int | None:
    if text is None:
        return None
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            return None
        return int(f) if math.isfinite(f) and f == int(f) else None


def _float(text) -> float | None:
    try:
        f = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _read_csv(path: Path, required: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """Rows of ``path`` as dicts (repeated header lines dropped) and the column names."""
    if not path.is_file():
        where = "" if path.parent.is_dir() else f" (folder {path.parent} does not exist)"
        raise ReportError(f"{path} not found{where}: run an experiment first, the runner writes it")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if not columns:
                return [], []
            reader.fieldnames = columns
            missing = [c for c in required if c not in columns]
            if missing:
                raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = [row for row in reader if row.get(columns[0]) != columns[0]]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    return rows, columns


@dataclass
class Data:
    runs: list[Run]  # rounds.csv, one per (experiment, setting, protocol, malicious, repeat)
    stake_runs: list[Run]  # stakes.csv, likewise
    notes: list[str]
    vote_columns: bool


def _ident(row: dict) -> tuple | None:
    exp = (row.get("experiment") or "").strip()
    protocol = (row.get("protocol") or "").strip()
    mal, rep, rnd = _int(row.get("malicious")), _int(row.get("repeat")), _int(row.get("round"))
    if not exp or not protocol or mal is None or rep is None or rnd is None:
        return None
    setting = (row.get("setting") or "").strip()
    run_id = (row.get("run_id") or "").strip()
    return exp, setting, protocol, mal, rep, run_id, rnd


def _dedupe(runs: dict[tuple, Run], what: str, notes: list[str]) -> list[Run]:
    """One run per (experiment, condition, repeat): the one appended last wins."""
    best: dict[tuple, Run] = {}
    dropped = 0
    for run in sorted(runs.values(), key=lambda r: r.order):
        key = (run.experiment, *run.cond, run.repeat)
        if key in best:
            dropped += 1
        best[key] = run
    if dropped:
        notes.append(f"{what}: {dropped} run(s) reused a repeat index of an earlier run; the later run was kept.")
    return sorted(best.values(), key=lambda r: r.order)


def _load(out: Path) -> Data:
    round_rows, round_cols = _read_csv(out / ROUNDS_CSV, ROUND_KEYS)
    stake_rows, _ = _read_csv(out / STAKES_CSV, STAKE_KEYS)
    notes: list[str] = []

    runs: dict[tuple, Run] = {}
    bad = 0
    for row in round_rows:
        ident = _ident(row)
        if ident is None:
            bad += 1
            continue
        *key, rnd = ident
        run = runs.get(tuple(key))
        if run is None:
            run = runs[tuple(key)] = Run(*key, order=len(runs))
        parsed = {k: _int(row.get(k)) for k in ROUND_INTS}
        parsed["accuracy"] = _float(row.get("accuracy"))
        parsed["seconds"] = _float(row.get("seconds"))
        run.rounds[rnd] = parsed
    if bad:
        notes.append(f"{ROUNDS_CSV}: {bad} malformed row(s) skipped.")

    stake_runs: dict[tuple, Run] = {}
    bad = 0
    for row in stake_rows:
        ident = _ident(row)
        device = (row.get("device") or "").strip()
        stake = _float(row.get("stake"))
        if ident is None or not device or stake is None:
            bad += 1
            continue
        *key, rnd = ident
        run = stake_runs.get(tuple(key))
        if run is None:
            run = stake_runs[tuple(key)] = Run(*key, order=len(stake_runs))
        run.stakes[device][rnd] = stake
        if _int(row.get("is_malicious")) == 1:
            run.malicious_devices.add(device)
    if bad:
        notes.append(f"{STAKES_CSV}: {bad} malformed row(s) skipped.")

    vote_columns = all(c in round_cols for c in ("votes_positive", "votes_negative"))
    return Data(_dedupe(runs, ROUNDS_CSV, notes), _dedupe(stake_runs, STAKES_CSV, notes), notes, vote_columns)


# ----------------------------------------------------------------------------------------------
# labels and statistics


def setting_label(setting: str) -> str:
    """``"12W,5V,3M"`` -> ``"12 W, 5 V, 3 M"``; anything else unchanged."""
    m = re.fullmatch(r"\s*(\d+)\s*W\s*[,;/ ]\s*(\d+)\s*V\s*[,;/ ]\s*(\d+)\s*M\s*", setting, re.IGNORECASE)
    if m:
        return f"{m[1]} W, {m[2]} V, {m[3]} M"
    return setting or "(no setting)"


def protocol_name(protocol: str) -> str:
    return PROTOCOL_NAMES.get(protocol, protocol)


def _protocol_order(protocols) -> list[str]:
    known = [p for p in PROTOCOL_NAMES if p in protocols]
    return known + sorted(set(protocols) - set(known))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1); the deviation of one value is 0."""
    mean = math.fsum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {std:.1f}"  # one repeat: no spread to show


def _span(values) -> str:
    values = sorted(set(values))
    if not values:
        return "0"
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _ordered_experiments(names) -> list[str]:
    return [e for e in EXPERIMENT_ORDER if e in names] + sorted(set(names) - set(EXPERIMENT_ORDER))


def _conditions(runs: list[Run]) -> dict[tuple, list[Run]]:
    """(setting, protocol, malicious) -> runs sorted by repeat, in order of first appearance."""
    conds: dict[tuple, list[Run]] = {}
    for run in runs:
        conds.setdefault(run.cond, []).append(run)
    for rs in conds.values():
        rs.sort(key=lambda r: r.repeat)
    return conds


# ----------------------------------------------------------------------------------------------
# table.md


def _table_section(exp: str, runs: list[Run]) -> list[str]:
    conds = _conditions(runs)
    settings = list(dict.fromkeys(r.setting for r in runs))
    protocols = _protocol_order({r.protocol for r in runs})
    mal_of = defaultdict(set)  # protocol -> malicious counts
    for setting, protocol, mal in conds:
        mal_of[protocol].add(mal)

    if exp in BY_MALICIOUS:
        # rows: (setting, malicious count); columns: protocol
        rows = sorted({(s, m) for s, _, m in conds}, key=lambda k: (settings.index(k[0]), k[1]))
        cols = [(p,) for p in protocols]
        col_names = [protocol_name(p) for p in protocols]
        multi_setting = len(settings) > 1
        head = ["Malicious devices"] + (["Device setting"] if multi_setting else [])
        row_cells = [[str(m)] + ([_md(setting_label(s))] if multi_setting else []) for s, m in rows]

        def cell_runs(row, col):
            return conds.get((row[0], col[0], row[1]), [])

    else:
        # rows: setting; columns: protocol (split by malicious count when a protocol has several)
        if exp == "table4":
            protocols = _protocol_order(set(protocols) | set(TABLE4_PROTOCOLS))
        rows = [(s,) for s in settings]
        cols, col_names = [], []
        for p in protocols:
            mals = sorted(mal_of.get(p, ())) or [None]
            for m in mals:
                cols.append((p, m))
                col_names.append(protocol_name(p) + (f" ({m} mal.)" if len(mals) > 1 else ""))
        head = ["Device setting"]
        row_cells = [[_md(setting_label(s))] for (s,) in rows]

        def cell_runs(row, col):
            return conds.get((row[0], col[0], col[1]), [])

    n_repeats = [len(rs) for rs in conds.values()]
    n_rounds = [len(r.rounds) for r in runs]
    lines = [
        f"## {EXPERIMENT_TITLES.get(exp, exp)}",
        "",
        f"Experiment `{exp}`: {len(runs)} run(s) found, {_span(n_repeats)} repeat(s) per cell, "
        f"{_span(n_rounds)} round(s) per run (max round {max((max(r.rounds) for r in runs), default=0)}). "
        "Test accuracy in %, mean ± std over repeats (sample std, n−1; a single repeat shows its value alone).",
        "",
    ]
    if exp in BY_MALICIOUS and len(settings) == 1:
        lines += [f"Device setting: {_md(setting_label(settings[0]))}.", ""]
    if exp not in BY_MALICIOUS:
        mal_text = ", ".join(
            f"{protocol_name(p)} {'/'.join(map(str, sorted(mal_of[p])))}" for p in protocols if p in mal_of
        )
        lines += [f"Malicious devices per protocol: {mal_text}.", ""]

    def table(title: str, value) -> list[str]:
        out = [f"**{title}**", "", "| " + " | ".join(head + col_names) + " |", "|" + "---|" * (len(head) + len(cols))]
        ragged = False
        for row, first in zip(rows, row_cells):
            cells = []
            for col in cols:
                rs = cell_runs(row, col)
                finals = [r.final() for r in rs]
                vals = [v for v in (value(r) for r in rs) if v is not None]
                text = fmt_mean_std(vals)
                if vals and len({f[0] for f in finals if f}) > 1:
                    text += " †"
                    ragged = True
                cells.append(text)
            out.append("| " + " | ".join(first + cells) + " |")
        if ragged:
            out += ["", "† the runs of this cell ended at different rounds (incomplete runs)."]
        return out + [""]

    lines += table("Final-round accuracy (%)", lambda r: (r.final() or (None, None))[1])
    if exp == "table4":
        lines += table("Mean accuracy over the last 3 rounds (%)", lambda r: r.last_mean(3))
    return lines


# ----------------------------------------------------------------------------------------------
# figures


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ReportError("matplotlib is not installed: pip install 'posbfl-testbed[report]'") from None
    return matplotlib, FigureCanvasAgg, Figure, Line2D, MaxNLocator


@dataclass
class CoincidentStyle:
    """How to draw one of a group of coinciding curves so that none hides another."""

    others: list[int]  # indices of the curves it coincides with
    kwargs: dict  # linestyle, marker, markersize, markevery for Axes.plot


def coinciding_groups(curves: list[tuple[list[int], list[float]]], span: float) -> list[list[int]]:
    """Groups (two or more curve indices, ascending) of curves that coincide (see COINCIDE_FRACTION)."""
    tol = COINCIDE_FRACTION * span
    parent = list(range(len(curves)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, (xa, ya) in enumerate(curves):
        a = dict(zip(xa, ya))
        for j in range(i + 1, len(curves)):
            b = dict(zip(*curves[j]))
            if not a or not b:
                continue
            shorter, longer = (a, b) if len(a) <= len(b) else (b, a)
            if all(x in longer and abs(y - longer[x]) <= tol for x, y in shorter.items()):
                parent[root(j)] = root(i)
    groups = defaultdict(list)
    for i in range(len(curves)):
        groups[root(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def coincidence_styles(curves: list[tuple[list[int], list[float]]], span: float) -> list[CoincidentStyle | None]:
    """Per curve: None, or the style that keeps it visible among the curves it coincides with.

    The k curves of a group get dashes of one length with gaps of k-1 lengths, shifted by one
    length each, so their colours alternate along the shared line; and each gets its own marker
    shape, placed on every k-th round starting at a different round (larger shapes first)."""
    out: list[CoincidentStyle | None] = [None] * len(curves)
    dash = 4.0
    for group in coinciding_groups(curves, span):
        k = len(group)
        for pos, i in enumerate(group):
            n = len(curves[i][0])
            step = k * max(1, round(n / (8 * k)))  # about 8 markers per curve at most
            start = pos * step // k
            out[i] = CoincidentStyle(
                others=[j for j in group if j != i],
                kwargs={"linestyle": (pos * dash, (dash, (k - 1) * dash)),
                        "marker": COINCIDE_MARKERS[pos % len(COINCIDE_MARKERS)],
                        # staggered markers do not overlap; where a curve is too short to stagger,
                        # every curve marks every round and the larger shapes are drawn first
                        "markersize": 6 if start < n else 4 + 2 * (k - 1 - pos),
                        "markevery": (start, step) if start < n else None},
            )
    return out


class _Plotter:
    def __init__(self):
        (self.mpl, self.Canvas, self.Figure, self.Line2D, self.MaxNLocator) = _matplotlib()
        self.legends: dict[str, list[str]] = {}  # figure file name -> its legend labels, in order
        self.coincidences: list[str] = []  # "<figure>: <label> (coincides with ...)", for table.md's notes

    def figure(self, figsize=FIGSIZE):
        fig = self.Figure(figsize=figsize, dpi=DPI)
        self.Canvas(fig)
        return fig

    def note_coincidence(self, path: Path, labels: list[str]) -> None:
        self.coincidences.append(
            f"{path.name}: {'; '.join(labels)} coincide (at most {100 * COINCIDE_FRACTION:g} % of the y-axis span "
            "apart at every round they share); drawn with interleaved dashes and distinct markers.")

    def curve(self, ax, path: Path, i: int, xs, ys, color, kwargs: dict, names: list[str],
              extra: CoincidentStyle | None, refs: list[str] | None = None) -> tuple[object, str]:
        """Draw curve ``i`` of ``names`` (its label) on ``ax``; a coinciding one (``extra``) in
        its own style, its label saying which it coincides with (by ``refs``, default the
        names), and noted once per group for table.md. Returns its legend handle and label."""
        text, refs = names[i], refs or names
        if extra is not None:
            kwargs = {**kwargs, **extra.kwargs}
            text += f"\n(coincides with {', '.join(refs[j] for j in extra.others)})"
            if i < min(extra.others):
                self.note_coincidence(path, [refs[j] for j in sorted([i, *extra.others])])
        (line,) = ax.plot(xs, ys, color=color, linewidth=1.8, label=text, **kwargs)
        return (line if extra is None else self.coincident_handle(color, extra, text)), text

    def coincident_handle(self, color, style: CoincidentStyle, label: str):
        """Legend entry of a coinciding curve: its colour and marker on a short-dashed line."""
        return self.Line2D([], [], color=color, linewidth=1.8, linestyle=(0, (2, 1)), marker=style.kwargs["marker"],
                           markersize=6, label=label)

    def save(self, fig, path: Path) -> None:
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)

    # -- accuracy ------------------------------------------------------------------------------

    def accuracy(self, path: Path, exp: str, runs: list[Run]) -> str | None:
        """Draw accuracy.png; return why it was skipped, or None."""
        conds = {c: rs for c, rs in _conditions(runs).items() if any(r.accuracies() for r in rs)}
        if not conds:
            return "no accuracy values"
        settings = list(dict.fromkeys(c[0] for c in conds))
        protocols = _protocol_order({c[1] for c in conds})
        mals = sorted({c[2] for c in conds})
        mal_of = defaultdict(set)  # protocol -> malicious counts
        for c in conds:
            mal_of[c[1]].add(c[2])
        by_mal = exp in BY_MALICIOUS

        if by_mal:
            order = sorted(conds, key=lambda c: (c[2], settings.index(c[0]), protocols.index(c[1])))
            cmap = self.mpl.colormaps["viridis"]
            color_of = {m: cmap(0.9 * i / max(1, len(mals) - 1)) for i, m in enumerate(mals)}
            combos = list(dict.fromkeys((c[0], c[1]) for c in order))

            def style(c):
                return color_of[c[2]], LINESTYLES[combos.index((c[0], c[1])) % len(LINESTYLES)]

        else:
            order = sorted(conds, key=lambda c: (settings.index(c[0]), protocols.index(c[1]), c[2]))
            colors, spare = {}, iter(SPARE_COLORS * 4)
            for p in protocols:
                for i, m in enumerate(sorted(mal_of[p])):
                    colors[(p, m)] = PROTOCOL_COLORS.get(p, None) if i == 0 and p in PROTOCOL_COLORS else next(spare)

            def style(c):
                return colors[(c[1], c[2])], LINESTYLES[settings.index(c[0]) % len(LINESTYLES)]

        def label(c):
            parts = []
            if by_mal:
                parts.append(f"{c[2]} malicious")
            if len(settings) > 1:
                parts.append(setting_label(c[0]))
            if len(protocols) > 1 or not parts:
                parts.append(protocol_name(c[1]))
            if not by_mal and len(mal_of[c[1]]) > 1:
                parts.append(f"{c[2]} mal.")
            return ", ".join(parts)

        curves = []  # (condition, rounds, mean accuracies, per-round values)
        for c in order:
            per_round = defaultdict(list)
            for run in conds[c]:
                for r, a in run.accuracies():
                    per_round[r].append(a)
            xs = sorted(per_round)
            curves.append((c, xs, [math.fsum(per_round[x]) / len(per_round[x]) for x in xs], per_round))
        styles = coincidence_styles([(xs, ys) for _, xs, ys, _ in curves], 100.0)

        fig = self.figure(FIGSIZE if len(order) <= 6 else WIDE_FIGSIZE)  # wide: the legend goes to the right
        ax = fig.add_subplot()
        max_round = 0
        repeats = set()
        labels, handles = [], []
        names = [label(c) for c, _, _, _ in curves]
        for i, ((c, xs, means, per_round), extra) in enumerate(zip(curves, styles)):
            color, ls = style(c)
            kwargs = {"linestyle": ls, "marker": "o" if len(xs) <= 15 else None, "markersize": 4}
            handle, text = self.curve(ax, path, i, xs, means, color, kwargs, names, extra)
            handles.append(handle)
            labels.append(text)
            if len(conds[c]) > 1:
                ax.fill_between(xs, [min(per_round[x]) for x in xs], [max(per_round[x]) for x in xs],
                                color=color, alpha=0.15, linewidth=0)
            max_round = max(max_round, xs[-1])
            repeats.add(len(conds[c]))
        self.legends[path.name] = labels

        ax.set_ylim(0, 100)
        ax.set_xlim(0.5 if max_round <= 1 else 1, max(max_round, 2))
        ax.xaxis.set_major_locator(self.MaxNLocator(integer=True))
        ax.set_xlabel("Communication round")
        ax.set_ylabel("Test accuracy (%)")
        where = f" ({setting_label(settings[0])})" if len(settings) == 1 else ""
        who = f" {protocol_name(protocols[0])}" if len(protocols) == 1 else ""
        ax.set_title(f"{EXPERIMENT_SHORT.get(exp, exp)}:{who} accuracy vs communication round{where}\n"
                     f"mean over {_span(repeats)} repeat(s), shaded: min–max")
        n = len(order)
        if n > 6:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                      ncol=1 if n <= 16 else 2, handlelength=3)
        else:
            ax.legend(handles=handles, loc="best", framealpha=0.85, handlelength=3)
        self.save(fig, path)
        return None

    # -- stakes --------------------------------------------------------------------------------

    @staticmethod
    def pick_stake_run(stake_runs: list[Run]) -> Run | None:
        """The first PoS-BFL run with malicious devices, repeat 0 (falling back step by step)."""
        pos = [r for r in stake_runs if r.protocol == "pos-bfl" and r.stakes]
        for candidates in (
            [r for r in pos if r.malicious > 0 and r.repeat == 0],
            sorted((r for r in pos if r.malicious > 0), key=lambda r: (r.repeat, r.order)),
            sorted(pos, key=lambda r: (r.repeat, r.order)),
        ):
            if candidates:
                return candidates[0]
        return None

    def stakes(self, path: Path, exp: str, run: Run) -> None:
        def natural(d: str):
            return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", d)]

        devices = sorted(run.stakes, key=natural)
        honest = [d for d in devices if d not in run.malicious_devices]
        bad = [d for d in devices if d in run.malicious_devices]
        fig = self.figure()
        ax = fig.add_subplot()
        labels, handles = [], []
        top = max((v for d in devices for v in run.stakes[d].values()), default=0)
        low = min((v for d in devices for v in run.stakes[d].values()), default=0)
        if honest:  # one band (min-max over the honest devices per round) and its median
            xs = sorted({x for d in honest for x in run.stakes[d]})
            per_round = [[run.stakes[d][x] for d in honest if x in run.stakes[d]] for x in xs]
            band = f"honest devices ({len(honest)}): min–max"
            handles.append(ax.fill_between(xs, [min(v) for v in per_round], [max(v) for v in per_round],
                                           color=HONEST_COLOR, alpha=0.25, linewidth=0, label=band))
            median = f"honest devices ({len(honest)}): median"
            handles += ax.plot(xs, [statistics.median(v) for v in per_round], color=HONEST_COLOR, linewidth=2.0,
                               label=median)
            labels += [band, median]
        curves = [(sorted(run.stakes[d]), [run.stakes[d][x] for x in sorted(run.stakes[d])]) for d in bad]
        styles = coincidence_styles(curves, max(1.0, top - min(0, low)))
        names = [f"{d} (malicious)" for d in bad]
        for i, ((xs, ys), extra) in enumerate(zip(curves, styles)):
            color = MALICIOUS_COLORS[i % len(MALICIOUS_COLORS)]
            kwargs = {"linestyle": LINESTYLES[(i // len(MALICIOUS_COLORS)) % len(LINESTYLES)],
                      "marker": "o" if len(xs) <= 15 else None, "markersize": 4}
            handle, text = self.curve(ax, path, i, xs, ys, color, kwargs, names, extra, refs=bad)
            handles.append(handle)
            labels.append(text)
        self.legends[path.name] = labels
        pad = 0.03 * max(1.0, top - min(0, low))  # lines at 0 stay clear of the axis
        ax.set_ylim(min(0, low) - pad, top + pad)
        if len(labels) > 6:  # many malicious devices
            fig.set_size_inches(*WIDE_FIGSIZE)
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                      ncol=1 if len(labels) <= 16 else 2, handlelength=3)
        else:
            ax.legend(handles=handles, loc="upper left", framealpha=0.85, handlelength=3)
        ax.xaxis.set_major_locator(self.MaxNLocator(integer=True))
        ax.set_xlabel("Communication round")
        ax.set_ylabel("Stake (reward units)")
        ax.set_title(f"Stake per device: {EXPERIMENT_SHORT.get(exp, exp)}, {protocol_name(run.protocol)}, "
                     f"{setting_label(run.setting)}\n{run.malicious} malicious, repeat {run.repeat}"
                     + (f", run {run.run_id}" if run.run_id else ""))
        self.save(fig, path)

    # -- votes ---------------------------------------------------------------------------------

    def votes(self, path: Path, exp: str, runs: list[Run], notes: list[str]) -> str | None:
        groups: dict[tuple, list[Run]] = {}
        for run in runs:
            if run.protocol == "pos-bfl":
                groups.setdefault((run.setting, run.malicious), []).append(run)
        series = []
        for (setting, mal), rs in groups.items():
            pos, neg = defaultdict(list), defaultdict(list)
            for run in rs:
                for r, row in run.rounds.items():
                    if row["votes_positive"] is not None and row["votes_negative"] is not None:
                        pos[r].append(row["votes_positive"])
                        neg[r].append(row["votes_negative"])
            if pos:
                xs = sorted(pos)
                series.append(((setting, mal), xs, [sum(pos[x]) / len(pos[x]) for x in xs],
                               [sum(neg[x]) / len(neg[x]) for x in xs], len(rs)))
        if not series:
            return "no PoS-BFL runs with vote counts"
        if exp in BY_MALICIOUS:
            series.sort(key=lambda s: s[0][1])
        if len(series) > 4:  # four spread over the sweep: first, last and two between
            keep = sorted({round(i * (len(series) - 1) / 3) for i in range(4)})
            left = ", ".join(self._group_label(s[0], series) for i, s in enumerate(series) if i not in keep)
            notes.append(f"{path.name}: at most 4 settings are drawn; left out: {left}.")
            series = [series[i] for i in keep]
        n = len(series)
        nrows, ncols = (1, n) if n <= 2 else (2, 2)
        fig = self.figure(FIGSIZE if n <= 2 else (9, 6.5))
        axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
        for ax, (key, xs, pos, neg, nrep) in zip(axes, series):
            width = 0.8 if len(xs) < 2 else 0.8 * min(b - a for a, b in zip(xs, xs[1:]))
            ax.bar(xs, pos, width=width, color="tab:green", label="positive")
            ax.bar(xs, neg, width=width, bottom=pos, color="tab:red", label="negative")
            ax.set_title(f"{self._group_label(key, series)} (mean of {nrep})")
            ax.xaxis.set_major_locator(self.MaxNLocator(integer=True))
            ax.set_xlabel("Communication round")
            ax.grid(axis="x", visible=False)
        for ax in axes[n:]:
            ax.set_visible(False)
        for ax in axes[::ncols]:
            ax.set_ylabel("Votes per round")
        top = max(p + q for s in series for p, q in zip(s[2], s[3]))
        axes[0].set_ylim(0, max(1.0, top) * 1.3)  # headroom for the legend
        axes[0].legend(loc="upper center", ncol=2, framealpha=0.9)
        fig.suptitle(f"{EXPERIMENT_SHORT.get(exp, exp)}: PoS-BFL validator votes per round (mean over repeats)")
        self.save(fig, path)
        return None

    @staticmethod
    def _group_label(key: tuple, series) -> str:
        setting, mal = key
        mals = {s[0][1] for s in series}
        settings = {s[0][0] for s in series}
        parts = []
        if len(settings) > 1 or len(mals) == 1:
            parts.append(setting_label(setting))
        if len(mals) > 1:
            parts.append(f"{mal} malicious")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# entry point


def rows_of_run(folder: Path) -> tuple[list[dict], list[dict]]:
    """The rows.csv and stakes.csv rows of a single ``bfl run`` folder: its summary.json and
    the chain one honest device kept on disk (replayed from the genesis)."""
    import json

    from edge_agent.protocol.genesis import Genesis
    from edge_agent.store import ChainStore

    from .experiment import chain_rows

    try:
        summary = json.loads((folder / "summary.json").read_text())
        run_id, malicious = summary["run_id"], summary["malicious"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{folder / 'summary.json'}: not a summary of `bfl run` ({exc})") from None
    blocks, genesis = [], None
    for dev in sorted(set(summary.get("heads", {})) - set(malicious)):
        store = ChainStore(folder / "agents" / dev / "runs", run_id)
        env = store.load_genesis()
        if env is not None:
            genesis, blocks = Genesis(env), store.load_blocks()
            if len(blocks) >= len(summary.get("rounds", [])):
                break
    if genesis is None:
        raise ReportError(f"{folder}: no device's chain under agents/ (an --external run keeps them on the devices)")
    roles = "/".join(str(x) for x in summary.get("roles", []))
    ident = {"experiment": "run", "setting": f"{summary.get('devices')} devices {roles}",
             "protocol": summary.get("protocol", "pos-bfl"), "malicious": len(malicious), "repeat": 0, "run_id": run_id}  # fmt: skip
    return chain_rows(genesis, blocks, summary.get("rounds", []), malicious, ident)


def report_folder(src: Path, dest: Path | None = None, experiment: str | None = None) -> list[Path]:
    """``bfl report``: a ``bfl reproduce`` folder (rounds.csv, stakes.csv) or a ``bfl run``
    folder (summary.json and the devices' chains); the CSVs, table and figures go to ``dest``
    (default: ``src``)."""
    import csv as _csv

    from .reproduce import ROUND_FIELDS, STAKE_FIELDS

    src = Path(src)
    dest = Path(dest) if dest is not None else src
    dest.mkdir(parents=True, exist_ok=True)
    if (src / ROUNDS_CSV).exists():
        if dest.resolve() != src.resolve():
            for name in (ROUNDS_CSV, STAKES_CSV):
                if (src / name).exists():
                    (dest / name).write_bytes((src / name).read_bytes())
    elif (src / "summary.json").exists():
        rounds, stakes = rows_of_run(src)
        for name, fields, rows in ((ROUNDS_CSV, ROUND_FIELDS, rounds), (STAKES_CSV, STAKE_FIELDS, stakes)):
            with open(dest / name, "w", newline="") as f:
                w = _csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
    else:
        raise ReportError(f"{src}: neither a `bfl run` folder (summary.json) nor a `bfl reproduce` one (rounds.csv)")
    return build_report(dest, experiment)


def build_report(out: Path, experiment: str | None = None, plotter: _Plotter | None = None) -> list[Path]:
    """Write table.md, accuracy.png, stakes.png and votes.png into ``out``; return the paths written.

    ``experiment`` selects one experiment (table4 | fig6 | fig7 | fig8 | custom); ``None`` takes
    every experiment in the CSVs (figures then get an ``_<experiment>`` suffix if there are
    several). Raises :class:`ReportError` when a CSV is missing or unreadable or the requested
    experiment has no rows; empty or partial data only skips figures, noted in table.md.
    ``plotter`` (default: a new one) keeps each figure's legend labels in ``plotter.legends``.
    """
    out = Path(out)
    data = _load(out)
    plotter = plotter or _Plotter()
    notes = list(data.notes)

    found = _ordered_experiments({r.experiment for r in data.runs})
    if experiment is not None:
        if data.runs and experiment not in found:
            raise ReportError(f"{out / ROUNDS_CSV}: no rows for experiment {experiment!r} (found: {', '.join(found)})")
        selected = [experiment]
    else:
        selected = found

    written: list[Path] = []
    figures: list[str] = []
    sections: list[str] = []
    if not data.runs:
        notes.append(f"{ROUNDS_CSV} holds no data rows: no tables and no figures.")

    for exp in selected:
        runs = [r for r in data.runs if r.experiment == exp]
        stake_runs = [r for r in data.stake_runs if r.experiment == exp]
        if not runs:
            if data.runs:
                notes.append(f"{exp}: no rows in {ROUNDS_CSV}.")
            continue
        suffix = "" if len(selected) == 1 else f"_{exp}"
        sections += _table_section(exp, runs)

        def draw(name: str, fn, *args) -> None:
            path = out / f"{name}{suffix}.png"
            with plotter.mpl.rc_context(RC):
                reason = fn(path, exp, *args)
            if reason:
                notes.append(f"{path.name} not drawn: {reason}.")
                path.unlink(missing_ok=True)  # never leave a stale figure of an earlier report
            else:
                written.append(path)
                figures.append(path.name)

        draw("accuracy", plotter.accuracy, runs)

        run = plotter.pick_stake_run(stake_runs)
        if run is None:
            reason = "no PoS-BFL run in " + STAKES_CSV
            draw("stakes", lambda path, exp: reason)
        else:
            if not (run.malicious > 0 and run.repeat == 0):
                notes.append(f"stakes{suffix}.png: no PoS-BFL run with malicious devices at repeat 0; "
                             f"showing {setting_label(run.setting)}, {run.malicious} malicious, repeat {run.repeat}.")
            draw("stakes", lambda path, exp: plotter.stakes(path, exp, run))

        if data.vote_columns:
            draw("votes", plotter.votes, runs, notes)
        else:
            draw("votes", lambda path, exp: f"{ROUNDS_CSV} has no votes_positive/votes_negative columns")

    notes += plotter.coincidences
    title = "PoS-BFL testbed results" + (f": {experiment}" if experiment else "")
    lines = [f"# {title}", "", f"Source: `{ROUNDS_CSV}`, `{STAKES_CSV}` in this folder.", ""]
    lines += sections
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    table = out / TABLE_MD
    tmp = table.with_name(TABLE_MD + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, table)
    return [table, *written]
