"""The causal-LM training loss: lorafit's scored-positions logits against full [B, T, V] logits.

    .venv/bin/python scripts/bench_causal_loss.py [--steps 4] [--threads 2] [--out bench_results/causal_loss.json]

SmolLM2-135M-Instruct with the default LoRA on one batch of 8 Alpaca demo examples at 256
tokens (configs/alpaca_smollm2_lora.yaml). In one process, alternating, each step is a forward
and backward of the same batch, in eval mode (no dropout) so both sides compute the same loss:

- `full`: the model's [B, T, V] logits, shifted and flattened, cross-entropy with -100 ignored
  (what lorafit did before, and what a plain script does);
- `lorafit`: `lorafit.evaluate.causal_lm_logits`, the lm_head on the scored positions only.

Reported: the mean seconds of a step after `--warmup` steps of each, the memory faulted in per
step (first writes to fresh pages, read from /proc/self/stat), both ratios lorafit / full, and
the two losses, which must agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def faulted_mib() -> float:
    """Minor page faults of this process so far, in MiB of 4 KiB pages."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]) * 4 / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps of each side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench_results" / "causal_loss.json"))
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from lorafit.config import load_config
    from lorafit.evaluate import causal_lm_logits, model_inputs
    from lorafit.io import write_json
    from lorafit.trainer import Trainer

    torch.set_num_threads(args.threads)
    overrides = ["data.train_size=64", "train.steps=1", "output.report_to=[]", "output.plot=false"]
    overrides += ["output.dir=/tmp/lorafit-bench-causal-loss", "output.overwrite=true"]
    trainer = Trainer(load_config(str(ROOT / "configs" / "alpaca_smollm2_lora.yaml"), overrides))
    trainer.setup()
    batch = next(iter(trainer.train_sample_loader))
    model = trainer.model.eval()  # no dropout: both sides see the same function

    def full_logits_loss() -> torch.Tensor:
        logits = model(**model_inputs(batch)).logits  # [B, T, V]
        vocab = logits.shape[-1]
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, vocab).float(),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
        )

    def lorafit_loss() -> torch.Tensor:
        logits, targets, _ = causal_lm_logits(model, batch)  # [N, V], [N]
        return F.cross_entropy(logits.float(), targets)

    sides = {"full": full_logits_loss, "lorafit": lorafit_loss}
    seconds = {name: [] for name in sides}
    faulted = {name: [] for name in sides}
    losses = {}
    for step in range(args.warmup + args.steps):
        for name, loss_fn in sides.items():
            f0, t0 = faulted_mib(), time.perf_counter()
            loss = loss_fn()
            loss.backward()
            elapsed, mib = time.perf_counter() - t0, faulted_mib() - f0
            model.zero_grad(set_to_none=True)
            losses[name] = loss.item()
            if step >= args.warmup:
                seconds[name].append(elapsed)
                faulted[name].append(mib)
    result = {
        "batch": list(batch["input_ids"].shape),
        "scored_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "threads": args.threads,
        "steps": args.steps,
        "seconds_per_step": {k: statistics.mean(v) for k, v in seconds.items()},
        "faulted_mib_per_step": {k: statistics.mean(v) for k, v in faulted.items()},
        "loss": losses,
    }
    s, f = result["seconds_per_step"], result["faulted_mib_per_step"]
    result["time_ratio_lorafit_over_full"] = s["lorafit"] / s["full"]
    result["losses_agree"] = abs(losses["lorafit"] - losses["full"]) <= 1e-4 * abs(losses["full"])
    write_json(Path(args.out), result)
    print(
        f"batch {result['batch']} ({result['scored_tokens']} scored tokens), {args.threads} threads, "
        f"{args.steps} steps each after {args.warmup} warm-up steps\n"
        f"  full logits: {s['full']:.2f} s/step, {f['full']:.0f} MiB faulted/step\n"
        f"  lorafit:     {s['lorafit']:.2f} s/step, {f['lorafit']:.0f} MiB faulted/step\n"
        f"  time ratio lorafit / full: {result['time_ratio_lorafit_over_full']:.2f}; "
        f"losses {losses['full']:.6f} / {losses['lorafit']:.6f} "
        f"({'agree' if result['losses_agree'] else 'DIFFER'})\n"
        f"  -> {args.out}"
    )
    if not result["losses_agree"]:
        raise SystemExit("the two losses differ")


if __name__ == "__main__":
    main()
