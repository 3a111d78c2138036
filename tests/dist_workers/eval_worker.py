"""Worker for tests/test_distributed.py: distributed evaluation must equal single-process.

    torchrun --standalone --nproc_per_node 2 tests/dist_workers/eval_worker.py OUT BERT_DIR LLAMA_DIR

Each rank evaluates the same model on the same odd-sized data twice: through
`accelerator.prepare(loader)` + `lorafit.evaluate.evaluate` (sharded, padded last batch,
`gather_for_metrics`), and alone over the whole unsharded loader (the single-process
reference). Cases: classification (map-style, 37 examples), classification through an
IterableDataset, causal LM (23 examples). A negative control counts the padding duplicates
(plain `gather`), to show the data really are padded. Writes OUT/eval.rank<r>.json.
"""

from __future__ import annotations

import json
import random
import sys
from types import SimpleNamespace

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset

from lorafit import data as D
from lorafit.config import EvalConfig, MethodConfig, ModelConfig
from lorafit.distributed import dataloader_config, leave_process_group, use_cpu
from lorafit.evaluate import evaluate
from lorafit.methods import build_model

OUT, BERT, LLAMA = sys.argv[1:4]
N_CLS, N_LM, BATCH = 37, 23, 4
WORDS = "the movie was great boring film story terrible joy dull write poem sea paris".split()


class Rows(torch.utils.data.IterableDataset):
    """The tokenised examples as a stream (no __len__, no indexing)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        for i in range(len(self.dataset)):
            yield self.dataset[i]


def plain(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def per_example(result) -> dict:
    pe = result.per_example
    order = np.argsort(pe["row"], kind="stable")
    return {k: np.asarray(v)[order].tolist() for k, v in pe.items()}


def main() -> None:
    accelerator = Accelerator(cpu=use_cpu(), dataloader_config=dataloader_config())
    local = SimpleNamespace(  # a single process: nothing to gather
        gather_for_metrics=lambda x: x, device=accelerator.device, num_processes=1
    )
    eval_cfg = EvalConfig()
    rng = random.Random(0)
    out = {"rank": accelerator.process_index, "world": accelerator.num_processes}

    # classification, 3 classes, odd-sized
    torch.manual_seed(0)
    built = build_model(
        ModelConfig(name_or_path=BERT, max_length=16),
        MethodConfig(name="head"),
        "classification",
        num_labels=3,
    )
    model, tok = built.model.eval(), built.tokenizer
    raw = Dataset.from_dict(
        {
            "text": [" ".join(rng.sample(WORDS, 5)) for _ in range(N_CLS)],
            "label": [rng.randrange(3) for _ in range(N_CLS)],
            "row": list(range(N_CLS)),
        }
    )
    ds = D.tokenize(raw, tok, "classification", 16)
    collate = D.Collator(tok, "classification")

    def loader(data):
        return torch.utils.data.DataLoader(data, batch_size=BATCH, collate_fn=collate)

    def run(acc, dl, task="classification", m=model):
        r = evaluate(m, dl, acc, task, eval_cfg, num_classes=3, keep_per_example=True)
        return {"metrics": plain(r.metrics), "per_example": per_example(r)}

    out["cls_single"] = run(local, loader(ds))
    out["cls_dist"] = run(accelerator, accelerator.prepare(loader(ds)))
    out["cls_iterable"] = run(accelerator, accelerator.prepare(loader(Rows(ds))))
    out["cls_local_batches"] = len(accelerator.prepare(loader(ds)))
    # negative control: a plain gather keeps the padding duplicates of the last batch
    control = SimpleNamespace(
        gather_for_metrics=accelerator.gather, device=accelerator.device, num_processes=2
    )
    out["cls_control"] = run(control, accelerator.prepare(loader(ds)))

    # causal LM, odd-sized
    torch.manual_seed(0)
    lm = build_model(
        ModelConfig(name_or_path=LLAMA, max_length=32), MethodConfig(name="lora", r=4), "causal_lm"
    )
    lm_model, lm_tok = lm.model.eval(), lm.tokenizer
    convs = [
        [
            {"role": "user", "content": " ".join(rng.sample(WORDS, 3))},
            {"role": "assistant", "content": " ".join(rng.sample(WORDS, 1 + i % 4))},
        ]
        for i in range(N_LM)
    ]
    lm_ds = D.tokenize(
        Dataset.from_dict({"messages": convs, "row": list(range(N_LM))}), lm_tok, "causal_lm", 32
    )
    lm_collate = D.Collator(lm_tok, "causal_lm")

    def lm_loader(data):
        return torch.utils.data.DataLoader(data, batch_size=BATCH, collate_fn=lm_collate)

    out["lm_single"] = run(local, lm_loader(lm_ds), "causal_lm", lm_model)
    out["lm_dist"] = run(accelerator, accelerator.prepare(lm_loader(lm_ds)), "causal_lm", lm_model)
    with open(f"{OUT}/eval.rank{accelerator.process_index}.json", "w") as fh:
        json.dump(out, fh)
    leave_process_group()


if __name__ == "__main__":
    main()
