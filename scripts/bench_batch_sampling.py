"""Causal-LM training steps with random batches against batches grouped by length.

    .venv/bin/python scripts/bench_batch_sampling.py [--steps 8] [--threads 2] [--out bench_results/batch_sampling.json]

SmolLM2-135M-Instruct with LoRA on the Alpaca demo set (configs/alpaca_smollm2_lora.yaml with
700 training rows, batch 8, max_length 256). Two measurements:

- padding, over the first `--plan-steps` steps of each sampler (no model needed): the tokens
  the model computes (batch size x longest row, summed over batches) and how many of them are
  real rows rather than padding;
- time, in one process, alternating: forward + backward passes of the batches each sampler
  gives at `--steps` step numbers spread evenly over the plan (after `--warmup` of each), in
  eval mode so that the time depends only on the batches. Spread, because grouped batches run
  longest first within each chunk of 50 steps: the first steps alone would overstate the time. The peer is `train.batch_sampling=random`, lorafit's
  default; the ratio is by_length / random.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="timed steps of each sampler")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each sampler first")
    p.add_argument("--plan-steps", type=int, default=500, help="steps counted for the padding")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench_results" / "batch_sampling.json"))
    args = p.parse_args()

    import torch

    from lorafit.config import load_config
    from lorafit.io import write_json
    from lorafit.trainer import LengthGroupedBatchSampler, StepBatchSampler, Trainer

    torch.set_num_threads(args.threads)
    overrides = ["data.train_size=700", "train.batch_size=8", "train.steps=1"]
    overrides += ["output.report_to=[]", "output.plot=false", "output.overwrite=true"]
    overrides += ["output.dir=/tmp/lorafit-bench-batch-sampling"]
    trainer = Trainer(load_config(str(ROOT / "configs" / "alpaca_smollm2_lora.yaml"), overrides))
    trainer.setup()
    rows = trainer.train_set
    lengths = [len(ids) for ids in rows["input_ids"]]
    size, seed = trainer.train_cfg.batch_size, trainer.train_cfg.seed
    window = dict(start=0, stop=args.plan_steps)
    samplers = {
        "random": StepBatchSampler(len(rows), size, seed, **window),
        "by_length": LengthGroupedBatchSampler(lengths, size, seed, **window),
    }
    padding = {}
    for name, sampler in samplers.items():
        batches = list(sampler)
        computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        real = sum(lengths[i] for b in batches for i in b)
        padding[name] = {"computed_tokens": computed, "real_fraction": real / computed}

    model = trainer.model.eval()
    times: dict[str, list[float]] = {name: [] for name in samplers}
    losses: dict[str, list[float]] = {name: [] for name in samplers}
    spread = [round(k * (args.plan_steps - 1) / max(args.steps - 1, 1)) for k in range(args.steps)]
    for n, step in enumerate([0] * args.warmup + spread):
        for name, sampler in samplers.items():
            batch = trainer.collate([rows[i] for i in sampler.batch(step)])
            start = time.perf_counter()
            loss = trainer.compute_loss(batch)
            loss.backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if n >= args.warmup:
                times[name].append(elapsed)
                losses[name].append(float(loss.detach()))
    mean = {name: statistics.mean(t) for name, t in times.items()}
    result = {
        "model": "SmolLM2-135M-Instruct, LoRA r=16 (configs/alpaca_smollm2_lora.yaml)",
        "rows": len(rows),
        "batch_size": size,
        "threads": args.threads,
        "padding": padding,
        "computed_tokens_ratio": padding["by_length"]["computed_tokens"]
        / padding["random"]["computed_tokens"],
        "seconds_per_step": mean,
        "time_ratio": mean["by_length"] / mean["random"],
        "per_step_seconds": times,
        "mean_loss": {name: statistics.mean(v) for name, v in losses.items()},
    }
    write_json(args.out, result)
    for name in samplers:
        print(
            f"{name:9s}  {mean[name]:6.2f} s/step  real tokens {padding[name]['real_fraction']:.1%} "
            f"of {padding[name]['computed_tokens']:,} computed over {args.plan_steps} steps"
        )
    print(
        f"by_length / random: time {result['time_ratio']:.2f}, "
        f"computed tokens {result['computed_tokens_ratio']:.2f}  ->  {args.out}"
    )


if __name__ == "__main__":
    main()
