"""Does bf16 train as well as fp32? The same comparison twice, once per precision, paired by seed.

    python benchmarks/precision_parity.py                          # full and lora, 3 seeds, packaged job
    python benchmarks/precision_parity.py --methods lora --seeds 5 --override train.epochs=2

Runs `tunelab compare --seeds K` with train.precision=fp32 and with bf16 (two experiment folders under
benchmarks/results/), then prints per method the mean test accuracy of each, the per-seed differences
(bf16 − fp32) with a 95 % t-interval, and the training-time ratio. An interval that holds 0 means the two
are indistinguishable at this many seeds. bf16 is only worth running where it is native (the script says
when it is emulated and would take hours).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from statistics import fmean

HERE = Path(__file__).resolve().parent


def run(precision: str, args, out: Path) -> dict:
    command = [sys.executable, "-m", "tunelab", "compare", f"methods={args.methods}", f"train.precision={precision}",
               *args.override, "--seeds", str(args.seeds), "--output", str(out), "--no-progress"]
    subprocess.run(command, check=True)
    return {(m["method"], m["seed"]): m for m in json.loads((out / "results.json").read_text())["methods"]}


def paired(fp32: dict, bf16: dict, method: str) -> dict:
    from scipy import stats

    seeds = sorted(seed for (m, seed) in fp32 if m == method and (m, seed) in bf16)
    acc = lambda runs, seed: runs[(method, seed)]["test"]["accuracy"]  # noqa: E731
    diffs = [acc(bf16, s) - acc(fp32, s) for s in seeds]
    mean = fmean(diffs)
    half = (stats.t.ppf(0.975, len(diffs) - 1) * stats.tstd(diffs) / len(diffs) ** 0.5) if len(diffs) > 1 else float("nan")
    return {"method": method, "seeds": seeds, "fp32": fmean(acc(fp32, s) for s in seeds),
            "bf16": fmean(acc(bf16, s) for s in seeds), "diff": mean, "interval": [mean - half, mean + half],
            "time_ratio": fmean(fp32[(method, s)]["train_time_s"] / bf16[(method, s)]["train_time_s"] for s in seeds)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from tunelab.train.setup import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():
        print("warning: this CPU emulates bf16 (no AMX/AVX512-BF16): the bf16 half will be very slow", file=sys.stderr)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folders = {p: HERE / "results" / f"precision-{p}-{stamp}" for p in ("fp32", "bf16")}
    fp32, bf16 = run("fp32", args, folders["fp32"]), run("bf16", args, folders["bf16"])
    rows = [paired(fp32, bf16, m) for m in args.methods.split(",")]
    print(f"{'method':<14}{'seeds':>6}{'fp32 acc':>10}{'bf16 acc':>10}  bf16 - fp32 [95 % interval]   fp32 time / bf16 time")
    for r in rows:
        lo, hi = r["interval"]
        print(f"{r['method']:<14}{len(r['seeds']):>6}{r['fp32']:>10.4f}{r['bf16']:>10.4f}  {r['diff']:+.4f} "
              f"[{lo:+.4f}, {hi:+.4f}]   {r['time_ratio']:.2f}×")
    (HERE / "results" / f"precision-{stamp}.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
