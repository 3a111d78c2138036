"""Two probes of the contrastive recipe on the selection dev sets (training-split data only).

    python scripts/contrastive_probes.py head --datasets sst2 mr
    python scripts/contrastive_probes.py interpolate --datasets sst2

`head`: the frozen MiniLM body, and the fitted head alone varied: logistic regression with
C = 1/l2 in {0.01, 0.1, 1, 10, 100}, on raw or L2-normalised embeddings. Asks whether the head
fit, not the body, is what limits accuracy.

`interpolate`: one default LoRA run per data seed, then its trained update scaled by
a in {0, 0.25, 0.5, 0.75, 1} (a=0 is the frozen body; weight-space interpolation between base
and fine-tuned weights, WiSE-FT, Wortsman et al. 2022), the head refitted at each a. Asks
whether the fine-tuned body overshoots.

Both use scripts/select_defaults.py's dev sets and K-shot draws (data seeds 1, 2, 3: the same
16 + 16 examples per class as its runs) and never open a test split. One line per data seed is
printed; nothing is written but the interpolate runs' folders under <out>.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from recipes_table import DATASETS, QUIET  # noqa: E402
from select_defaults import data_overrides, prepare  # noqa: E402

L2_VALUES = (100.0, 10.0, 1.0, 0.1, 0.01)  # C = 0.01 ... 100
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


def train_and_dev_embeddings(trainer) -> tuple:
    """((embeddings [N, H], labels [N]) of the training set, the same of the dev set)."""
    from lorafit.evaluate import embed_dataset

    return tuple(
        embed_dataset(trainer.model, loader, trainer.accelerator)
        for loader in (trainer.train_embed_loader, trainer.test_loader)
    )


def fitted_head_accuracy(train, dev, num_classes: int, **fit_options) -> float:
    """Fit the logistic-regression head on (embeddings, labels) `train`; % accuracy on `dev`."""
    from lorafit.objectives import fit_logistic_head

    (x_train, y_train), (x_dev, y_dev) = train, dev
    weight, bias = fit_logistic_head(x_train, y_train, num_classes, **fit_options)
    return 100 * ((x_dev @ weight.T + bias).argmax(-1) == y_dev).float().mean().item()


def trainer_for(dataset: str, folder: Path, seed: int, out: Path):
    from lorafit.config import load_config
    from lorafit.trainer import Trainer

    overrides = [
        "model.name_or_path=minilm",
        *data_overrides(dataset, folder),
        "data.k_shot=16",
        f"data.seed={seed}",
        f"train.seed={seed}",
        "method.name=lora",
        "train.eval_every=200",
        f"output.dir={out / f'{dataset}-seed{seed}'}",
        "output.overwrite=true",
        *QUIET,
    ]
    trainer = Trainer(load_config(None, overrides))
    trainer.setup()
    return trainer


def probe_head(dataset: str, folder: Path, seed: int, out: Path) -> str:
    import torch.nn.functional as F

    trainer = trainer_for(dataset, folder, seed, out)  # set up, never trained: the frozen body
    (x_train, y_train), (x_dev, y_dev) = train_and_dev_embeddings(trainer)
    cells = []
    for normalise in (False, True):
        prepare_x = (lambda x: F.normalize(x, dim=-1)) if normalise else (lambda x: x)
        for l2 in L2_VALUES:
            accuracy = fitted_head_accuracy(
                (prepare_x(x_train), y_train), (prepare_x(x_dev), y_dev), trainer.num_classes, l2=l2
            )
            cells.append(f"{'norm' if normalise else 'raw'} C={1 / l2:g}: {accuracy:.1f}")
    return " | ".join(cells)


def probe_interpolate(dataset: str, folder: Path, seed: int, out: Path) -> str:
    from peft.tuners.lora import LoraLayer

    trainer = trainer_for(dataset, folder, seed, out)
    summary = trainer.train()
    layers = [m for m in trainer.model.modules() if isinstance(m, LoraLayer)]
    trained = [dict(m.scaling) for m in layers]  # adapter name -> alpha / r
    cells = []
    for scale in SCALES:
        for layer, scaling in zip(layers, trained):
            layer.scaling.update({name: value * scale for name, value in scaling.items()})
        accuracy = fitted_head_accuracy(*train_and_dev_embeddings(trainer), trainer.num_classes)
        cells.append(f"a={scale:g}: {accuracy:.1f}")
    return f"run {100 * summary['test']['accuracy']:.1f} | " + " | ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("probe", choices=("head", "interpolate"))
    p.add_argument("--datasets", nargs="+", default=["sst2", "mr"], choices=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--out", default=str(ROOT / "runs" / "select"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    folders = prepare(out)
    probe = probe_head if args.probe == "head" else probe_interpolate
    for dataset in args.datasets:
        for seed in args.seeds:
            line = probe(dataset, folders[dataset], seed, out / "probes")
            print(f"{dataset} seed {seed}: {line}", flush=True)


if __name__ == "__main__":
    main()
