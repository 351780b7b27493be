"""Tests of orchestrator.report on synthetic-but-plausible runner CSVs (no agents, no broker)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the report extra is not installed: pip install 'posbfl-testbed[report]'")
from matplotlib.image import imread  # noqa: E402

from orchestrator.report import ReportError, build_report, fmt_mean_std, setting_label  # noqa: E402

ROUND_COLS = ["experiment", "setting", "protocol", "malicious", "repeat", "round", "accuracy", "accepted",
              "rejected", "malicious_workers", "malicious_accepted", "votes_positive", "votes_negative",
              "seconds", "run_id"]
STAKE_COLS = ["experiment", "setting", "protocol", "malicious", "repeat", "round", "device", "stake",
              "is_malicious", "run_id"]

SETTINGS = {"12W,5V,3M": 12, "8W,9V,3M": 8}  # setting -> workers per round
# final-round (round 5) accuracy per (setting, protocol, repeat): the cells checked by hand below
FINAL = {
    ("12W,5V,3M", "vanilla"): (11.0, 13.0),
    ("12W,5V,3M", "pfedme"): (13.0, 14.0),
    ("12W,5V,3M", "pos-bfl"): (86.0, 88.0),
    ("8W,9V,3M", "vanilla"): (10.0, 10.0),
    ("8W,9V,3M", "pfedme"): (11.0, 12.0),
    ("8W,9V,3M", "pos-bfl"): (95.0, 93.0),
}
ROUNDS = 5
DEVICES = [f"d{i:02d}" for i in range(20)]
MALICIOUS = {"d03", "d11", "d17"}


def accuracy_curve(final: float, rnd: int) -> float:
    """Rises (or for collapsed baselines falls) towards ``final`` by round 5."""
    start = 40.0 if final > 50 else 30.0
    return round(start + (final - start) * rnd / ROUNDS, 2)


def write_csvs(out: Path, experiment: str = "table4", repeats: int = 2, settings=SETTINGS,
               protocols=("vanilla", "pfedme", "pos-bfl"), malicious: int = 3) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "rounds.csv").open("w", newline="") as fr, (out / "stakes.csv").open("w", newline="") as fs:
        rw, sw = csv.writer(fr), csv.writer(fs)
        rw.writerow(ROUND_COLS)
        sw.writerow(STAKE_COLS)
        for setting, workers in settings.items():
            for protocol in protocols:
                for rep in range(repeats):
                    run_id = f"{experiment}-{setting.replace(',', '')}-{protocol}-r{rep}"
                    final = FINAL[(setting, protocol)][rep]
                    stakes = {d: 0 for d in DEVICES}
                    for rnd in range(1, ROUNDS + 1):
                        mal_workers = 2 if rnd % 2 else 1
                        rejected = mal_workers if protocol == "pos-bfl" else 0
                        votes_neg = 2 * rejected + (rnd == 1)
                        rw.writerow([experiment, setting, protocol, malicious, rep, rnd,
                                     accuracy_curve(final, rnd), workers - rejected, rejected, mal_workers,
                                     mal_workers - rejected, workers - votes_neg, votes_neg, 20.5 + rnd, run_id])
                        if protocol != "pos-bfl":
                            continue
                        for i, d in enumerate(DEVICES):
                            stakes[d] += (rnd % 2) if d in MALICIOUS else 3 + (i + rnd) % 3
                            sw.writerow([experiment, setting, protocol, malicious, rep, rnd, d, stakes[d],
                                         int(d in MALICIOUS), run_id])


def table_row(md: str, first_cell: str) -> list[str]:
    lines = [ln for ln in md.splitlines() if ln.startswith(f"| {first_cell} |")]
    assert lines, f"no row {first_cell!r} in:\n{md}"
    return [c.strip() for c in lines[0].strip("|").split("|")]


def assert_png(path: Path) -> None:
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300, img.shape
    assert img.std() > 0.01  # not a blank canvas


def test_table4_report(tmp_path):
    write_csvs(tmp_path)
    paths = build_report(tmp_path, "table4")
    names = {p.name for p in paths}
    assert names == {"table.md", "accuracy.png", "stakes.png", "votes.png"}
    for p in paths:
        assert p.is_file() and p.parent == tmp_path
    for name in ("accuracy.png", "stakes.png", "votes.png"):
        assert_png(tmp_path / name)

    md = (tmp_path / "table.md").read_text()
    assert "| Device setting | VFL | pFedMe | PoS-BFL |" in md
    assert "2 repeat(s) per cell" in md and "5 round(s) per run" in md
    # hand-computed: PoS-BFL at 12 W, 5 V, 3 M ends at 86 and 88 -> mean 87.0, sample std sqrt(2) = 1.41
    row = table_row(md, "12 W, 5 V, 3 M")
    assert row == ["12 W, 5 V, 3 M", "12.0 ± 1.4", "13.5 ± 0.7", "87.0 ± 1.4"]
    assert table_row(md, "8 W, 9 V, 3 M")[3] == "94.0 ± 1.4"
    # last-3-rounds table: PoS-BFL 12W repeat 0 rounds 3..5 = 67.6, 76.8, 86.0 -> 76.8;
    # repeat 1 = 68.8, 78.4, 88.0 -> 78.4; mean 77.6, std 1.13
    last3 = md.split("last 3 rounds", 1)[1]
    assert table_row(last3, "12 W, 5 V, 3 M")[3] == "77.6 ± 1.1"
    assert "FedAvg" not in md  # no clean baseline in these runs


def test_single_repeat_missing_protocol_and_empty_stakes(tmp_path):
    write_csvs(tmp_path, repeats=1, settings={"12W,5V,3M": 12}, protocols=("vanilla", "pos-bfl"))
    (tmp_path / "stakes.csv").write_text(",".join(STAKE_COLS) + "\n")  # header only
    with (tmp_path / "rounds.csv").open("a") as f:
        f.write("table4,12W,5V,3M,pos-bfl\n")  # a torn last line, as after a crash mid-write
    paths = build_report(tmp_path)
    assert {p.name for p in paths} == {"table.md", "accuracy.png", "votes.png"}
    assert not (tmp_path / "stakes.png").exists()
    md = (tmp_path / "table.md").read_text()
    row = table_row(md, "12 W, 5 V, 3 M")
    assert row == ["12 W, 5 V, 3 M", "11.0", "n/a", "86.0"]  # one repeat: no spread shown
    assert "stakes.png not drawn" in md
    assert "1 malformed row(s) skipped" in md


def test_fig6_rows_are_malicious_counts(tmp_path):
    out = tmp_path / "fig6"
    write_csvs(out, experiment="fig6", settings={"12W,5V,3M": 12}, protocols=("pos-bfl",), malicious=4)
    # append a second malicious count with the same curves, as a later sweep point would be
    rows = list(csv.reader((out / "rounds.csv").open()))
    with (out / "rounds.csv").open("a", newline="") as f:
        w = csv.writer(f)
        for r in rows[1:]:
            w.writerow(r[:3] + ["8"] + r[4:6] + [str(float(r[6]) - 20)] + r[7:-1] + [r[-1] + "-m8"])
    paths = build_report(out, "fig6")
    assert {p.name for p in paths} == {"table.md", "accuracy.png", "stakes.png", "votes.png"}
    md = (out / "table.md").read_text()
    assert "| Malicious devices | PoS-BFL |" in md
    assert table_row(md, "4") == ["4", "87.0 ± 1.4"]
    assert table_row(md, "8") == ["8", "67.0 ± 1.4"]
    assert_png(out / "votes.png")


def test_several_experiments_get_suffixed_figures(tmp_path):
    write_csvs(tmp_path / "a", settings={"12W,5V,3M": 12})
    write_csvs(tmp_path / "b", experiment="fig8", settings={"12W,5V,3M": 12})
    for name in ("rounds.csv", "stakes.csv"):  # one OUT holding both experiments, appended
        extra = (tmp_path / "b" / name).read_text().split("\n", 1)[1]
        (tmp_path / "a" / name).write_text((tmp_path / "a" / name).read_text() + extra)
    paths = build_report(tmp_path / "a")
    names = {p.name for p in paths}
    assert {"table.md", "accuracy_table4.png", "accuracy_fig8.png", "stakes_fig8.png"} <= names
    md = (tmp_path / "a" / "table.md").read_text()
    assert "## Table 4" in md and "## Fig. 8" in md


def test_missing_inputs_raise_report_error(tmp_path):
    with pytest.raises(ReportError, match="rounds.csv") as exc:
        build_report(tmp_path / "nowhere")
    assert "\n" not in str(exc.value)
    write_csvs(tmp_path)
    (tmp_path / "stakes.csv").unlink()
    with pytest.raises(ReportError, match="stakes.csv"):
        build_report(tmp_path)
    write_csvs(tmp_path)
    with pytest.raises(ReportError, match="fig7"):
        build_report(tmp_path, "fig7")


def test_helpers():
    assert setting_label("12W,5V,3M") == "12 W, 5 V, 3 M"
    assert setting_label("mal=4") == "mal=4"
    assert fmt_mean_std([]) == "n/a"
    assert fmt_mean_std([50.0]) == "50.0"
    assert fmt_mean_std([86.0, 88.0]) == "87.0 ± 1.4"


# ----------------------------------------------------------------------------------------------
# figures: every line visible (pixel statistics of the rendered PNGs)


def color_mask(img, color: str, tol: float = 0.06):
    """Pixels of ``img`` (imread's float RGB(A)) within ``tol`` per channel of ``color``."""
    import numpy as np
    from matplotlib.colors import to_rgb

    return np.all(np.abs(img[..., :3] - np.array(to_rgb(color))) <= tol, axis=-1)


def line_columns(img, color: str) -> int:
    """In how many pixel columns ``color`` occurs: a curve across the axes spans hundreds, a
    legend swatch a few dozen."""
    return int(color_mask(img, color).any(axis=0).sum())


def rewrite_accuracy(out: Path, fn) -> None:
    """Replace each rounds.csv accuracy by ``fn(row, accuracy of the vanilla run at that round)``."""
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    vfl = {(r["setting"], r["repeat"], r["round"]): r["accuracy"] for r in rows if r["protocol"] == "vanilla"}
    for r in rows:
        r["accuracy"] = fn(r, float(vfl[(r["setting"], r["repeat"], r["round"])]))
    with (out / "rounds.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROUND_COLS)
        w.writeheader()
        w.writerows(rows)


def test_coinciding_curves_stay_visible(tmp_path):
    from orchestrator.report import _Plotter

    # pFedMe equal to VFL at every round (as when both sit at chance level), 0.4 points apart at most
    write_csvs(tmp_path, repeats=1, settings={"12W,5V,3M": 12})
    rewrite_accuracy(tmp_path, lambda r, vfl: vfl + 0.4 * (r["round"] == "3") if r["protocol"] == "pfedme"
                     else float(r["accuracy"]))
    plotter = _Plotter()
    build_report(tmp_path, plotter=plotter)
    img = imread(tmp_path / "accuracy.png")
    assert img.shape[:2] == (600, 960)  # FIGSIZE (8, 5) at 120 dpi
    # pFedMe (tab:green) is drawn after VFL (tab:red) on the same path: without interleaved dashes
    # red would show only in the legend swatch
    assert line_columns(img, "tab:red") > 250, line_columns(img, "tab:red")
    assert line_columns(img, "tab:green") > 250
    assert line_columns(img, "tab:blue") > 500  # PoS-BFL, alone, drawn plainly
    assert plotter.legends["accuracy.png"] == ["VFL\n(coincides with pFedMe)", "pFedMe\n(coincides with VFL)",
                                               "PoS-BFL"]
    assert "accuracy.png: VFL; pFedMe coincide" in (tmp_path / "table.md").read_text()

    # 1.5 points apart at one round is not coinciding (COINCIDE_FRACTION: 1 point on the 0-100 axis)
    rewrite_accuracy(tmp_path, lambda r, vfl: vfl + 1.5 * (r["round"] == "3") if r["protocol"] == "pfedme"
                     else float(r["accuracy"]))
    plotter = _Plotter()
    build_report(tmp_path, plotter=plotter)
    assert plotter.legends["accuracy.png"] == ["VFL", "pFedMe", "PoS-BFL"]
    assert "accuracy.png: " not in (tmp_path / "table.md").read_text()  # (stakes.png's note stays)


def test_coinciding_groups():
    from orchestrator.report import coinciding_groups

    flat = ([1, 2, 3], [10.0, 10.0, 10.0])
    assert coinciding_groups([flat, ([1, 2, 3], [10.0, 11.0, 9.0]), ([1, 2, 3], [10.0, 12.5, 10.0])], 100) == [[0, 1]]
    assert coinciding_groups([flat, ([1, 2], [10.0, 10.0]), ([4, 5], [10.0, 10.0])], 100) == [[0, 1]]  # shared rounds
    assert coinciding_groups([flat, ([1, 2, 3], [10.0, 10.0, 10.0])], 100) == [[0, 1]]
    assert coinciding_groups([flat, ([1, 2, 3], [12.0, 12.0, 12.0])], 100) == []
    assert coinciding_groups([flat, ([1, 2, 3], [12.0, 12.0, 12.0])], 300) == [[0, 1]]  # relative to the span


def test_stakes_band_and_malicious_lines(tmp_path):
    from orchestrator.report import _Plotter

    write_csvs(tmp_path, repeats=1, settings={"12W,5V,3M": 12})
    plotter = _Plotter()
    build_report(tmp_path, plotter=plotter)
    img = imread(tmp_path / "stakes.png")
    assert img.shape[:2] == (600, 960)
    # the honest band: tab:blue at alpha 0.25 over white
    from matplotlib.colors import to_rgb

    band = tuple(0.25 * c + 0.75 for c in to_rgb("tab:blue"))
    share = color_mask(img, band, tol=0.03).mean()
    assert share > 0.02, share  # a band (its legend swatch is < 0.1 %)
    # the three malicious devices have identical stakes: each keeps its own colour along the plot
    for color in ("tab:red", "tab:orange", "tab:purple"):
        assert line_columns(img, color) > 150, (color, line_columns(img, color))
    labels = plotter.legends["stakes.png"]
    assert labels[:2] == ["honest devices (17): min–max", "honest devices (17): median"]
    assert labels[2:] == ["d03 (malicious)\n(coincides with d11, d17)", "d11 (malicious)\n(coincides with d03, d17)",
                          "d17 (malicious)\n(coincides with d03, d11)"]

    # malicious stakes apart: plain lines, no coincidence
    rows = list(csv.DictReader((tmp_path / "stakes.csv").open()))
    for r in rows:
        if r["device"] in MALICIOUS:
            r["stake"] = str(int(r["stake"]) + 10 * sorted(MALICIOUS).index(r["device"]))
    with (tmp_path / "stakes.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=STAKE_COLS)
        w.writeheader()
        w.writerows(rows)
    plotter = _Plotter()
    build_report(tmp_path, plotter=plotter)
    assert plotter.legends["stakes.png"][2:] == ["d03 (malicious)", "d11 (malicious)", "d17 (malicious)"]
    img = imread(tmp_path / "stakes.png")
    for color in ("tab:red", "tab:orange", "tab:purple"):
        assert line_columns(img, color) > 400
