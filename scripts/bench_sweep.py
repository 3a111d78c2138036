"""Benchmark `lorafit compare`: 3 methods x 2 K x 3 seeds on MiniLM / SST-2 within 30 minutes.

    .venv/bin/python scripts/bench_sweep.py [--dir runs/bench-sweep] [--workers 1] [key=value ...]

Runs configs/compare_sst2_ci.yaml widened to K in {16, 64} and 3 seeds (18 runs; methods full,
head, lora; 50 steps, evaluation every 25, the full 872-sentence test set), then prints per run
the process time (start-up + data + model + training + test), the training loop's wall time and
the share of it spent evaluating (summary.json wall_time_s, eval_time_s). Writes bench.json into the sweep directory. Exit code 1 if over the budget.
Rerunning resumes: finished runs are not trained again (use a new --dir for a fresh timing).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorafit.io import write_json  # noqa: E402
from lorafit.sweep import run_compare  # noqa: E402

BUDGET_S = 30 * 60
BENCH_OVERRIDES = [
    "sweep.k_shots=[16,64]",
    "sweep.seeds=3",
    "base.train.steps=50",
    "base.train.eval_every=25",
    "base.data.max_test_examples=null",  # the full 872-sentence test set
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="runs/bench-sweep", help="sweep directory")
    parser.add_argument("--workers", type=int, default=1, help="runs at once")
    parser.add_argument("overrides", nargs="*", help="more sweep.x=... / base.x.y=... overrides")
    args = parser.parse_args()

    overrides = [
        *BENCH_OVERRIDES,
        f"sweep.dir={args.dir}",
        f"sweep.workers={args.workers}",
        *args.overrides,
    ]
    start = time.perf_counter()
    run_compare(ROOT / "configs" / "compare_sst2_ci.yaml", overrides)
    total = time.perf_counter() - start

    with open(Path(args.dir) / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    print(f"\n{'run':<22} {'status':<8} {'process s':>10} {'train loop s':>13} {'eval share':>11}")
    for r in runs:
        share = f"{100 * float(r['eval_share']):.0f}%" if r.get("eval_share") else "-"
        print(
            f"{r['run_id']:<22} {r['status']:<8} {r.get('process_time_s') or '-':>10} "
            f"{_round(r.get('wall_time_s')):>13} {share:>11}"
        )
    finished = [r for r in runs if r.get("wall_time_s")]
    process = [float(r["process_time_s"]) for r in runs if r.get("process_time_s")]
    loop = sum(float(r["wall_time_s"]) for r in finished)
    evaluation = sum(float(r["eval_time_s"]) for r in finished)
    result = {
        "runs": len(runs),
        "finished": len(finished),
        "sweep_wall_s": round(total, 1),
        "budget_s": BUDGET_S,
        "mean_process_s_per_run": round(sum(process) / len(process), 1) if process else None,
        "mean_train_loop_s_per_run": round(loop / len(finished), 1) if finished else None,
        "eval_share_of_train_loop": round(evaluation / loop, 3) if loop else None,
        "overrides": overrides,
    }
    write_json(Path(args.dir) / "bench.json", result)
    print(json.dumps(result, indent=2))
    within = total <= BUDGET_S and len(finished) == len(runs)
    print(
        f"{'PASS' if within else 'FAIL'}: {total / 60:.1f} min for {len(runs)} runs "
        f"(budget {BUDGET_S / 60:.0f} min)"
    )
    return 0 if within else 1


def _round(value) -> str:
    return f"{float(value):.1f}" if value else "-"


if __name__ == "__main__":
    sys.exit(main())
