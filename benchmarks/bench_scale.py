"""How the testbed grows with the number of devices on one machine.

Runs ``bench_round.py --skip-floor`` for each device count (MLP, roles 60/25/15 % of the
devices, small shards so that training is not what is measured) and prints one table: agents'
start-up, round time, messages and bytes the broker delivered in a round, broker CPU in that
round, peak PSS of the broker and of the whole testbed, and the growth per added device
between consecutive rows.

    python benchmarks/bench_scale.py                      # 20, 50, 100 devices
    python benchmarks/bench_scale.py --devices 20,50,100,200 --roles-for-200 120,20,60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def roles_for(n: int) -> str:
    w, v = round(0.6 * n), round(0.25 * n)
    return f"{w},{v},{n - w - v}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="20,50,100")
    ap.add_argument("--roles-for-200", default="120,20,60",
                    help="roles at 200 devices (60/25/15 %% would give blocks over the 1 MiB limit)")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.devices.split(",")]:
        roles = args.roles_for_200 if n == 200 else roles_for(n)
        out = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-"))
        cmd = [sys.executable, str(HERE / "bench_round.py"), "--model", "mlp", "--devices", str(n), "--roles", roles,
               "--samples", str(args.samples), "--epochs", str(args.epochs), "--rounds", str(args.rounds),
               "--skip-floor", "--out", str(out / "run"), "--json", str(out / "figures.json"),
               "--", "--test-per-device", "50", "--deadlines", "300,120,120"]  # fmt: skip
        print("#", " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"{n} devices: the run failed; see {out}")
            break
        f = json.loads((out / "figures.json").read_text())
        rows.append((n, roles, f))
    print(f"\n{'devices':>7} {'roles':>10} {'ready s':>8} {'round s':>8} {'msgs/round':>10} {'MB/round':>9} "
          f"{'broker CPU s':>12} {'broker MB':>9} {'testbed MB':>10}")  # fmt: skip
    for n, roles, f in rows:
        print(f"{n:>7} {roles:>10} {f['agents_ready_s']:>8.1f} {f['steady_round_s']:>8.1f} {f['delivered_msgs']:>10} "
              f"{f['delivered_mb']:>9.0f} {f['cpu_by_process_kind'].get('broker', 0):>12.1f} "
              f"{f['pss_by_kind_mb'].get('broker', 0):>9.0f} {f['peak_pss_mb']:>10.0f}")  # fmt: skip
    print("\ngrowth per added device between consecutive rows:")
    for (n0, _, a), (n1, _, b) in zip(rows, rows[1:]):
        d = n1 - n0
        print(f"  {n0}->{n1}: ready +{(b['agents_ready_s'] - a['agents_ready_s']) / d:.2f} s, "
              f"round +{(b['steady_round_s'] - a['steady_round_s']) / d:.2f} s, "
              f"msgs +{(b['delivered_msgs'] - a['delivered_msgs']) / d:.0f}, "
              f"MB +{(b['delivered_mb'] - a['delivered_mb']) / d:.1f}, "
              f"testbed PSS +{(b['peak_pss_mb'] - a['peak_pss_mb']) / d:.0f} MB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
