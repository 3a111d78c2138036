"""Probes of the contrastive recipe on the selection dev sets (training-split data only).

    python scripts/contrastive_probes.py head --datasets sst2 mr
    python scripts/contrastive_probes.py head --datasets sst2 mr --trained
    python scripts/contrastive_probes.py interpolate --datasets sst2
    python scripts/contrastive_probes.py self_train --datasets sst2
    python scripts/contrastive_probes.py ensemble --datasets sst2
    python scripts/contrastive_probes.py layers --datasets sst2 mr
    python scripts/contrastive_probes.py layers --datasets ag_news --frozen-only
    python scripts/contrastive_probes.py loss --datasets sst2 mr
    python scripts/contrastive_probes.py augment --datasets sst2 mr
    python scripts/contrastive_probes.py label_prompts --datasets sst2 mr
    python scripts/contrastive_probes.py setfit_pairs --datasets sst2 mr
    python scripts/contrastive_probes.py bitfit --datasets sst2 mr
    python scripts/contrastive_probes.py end_to_end --datasets sst2 mr
    python scripts/contrastive_probes.py simcse --datasets sst2 mr
    python scripts/contrastive_probes.py fold_validation --datasets sst2 mr ag_news [--method full]
    python scripts/contrastive_probes.py refit_calibration --datasets sst2 mr [--method full]

`head`: the frozen MiniLM body, and the fitted head alone varied: logistic regression with
C = 1/l2 in {0.01, 0.1, 1, 10, 100}, on raw or L2-normalised embeddings. Asks whether the head
fit, not the body, is what limits accuracy. `--trained` does the same on the body of a default
LoRA run (and prints its own dev accuracy first).

`interpolate`: one default LoRA run per data seed, then its trained update scaled by
a in {0, 0.25, 0.5, 0.75, 1} (a=0 is the frozen body; weight-space interpolation between base
and fine-tuned weights, WiSE-FT, Wortsman et al. 2022), the head refitted at each a. Asks
whether the fine-tuned body overshoots.

`self_train`: the frozen body, then the trained default LoRA body; on each, the head is fitted
on the 32 labelled examples, then refitted in rounds on them plus the most confident
pseudo-labelled texts of 2,000 unlabelled pool rows (10%, 25%, 50% of them, split evenly over
the predicted classes); then a second default LoRA run from the base model, trained on the 32
labelled rows plus the trained run's most confident half of the pool with its pseudo-labels
(self-training of the body). Asks whether unlabelled in-domain text helps. The pool rows' labels
are read only to print how accurate the pseudo-labels were.

`ensemble`: four default LoRA runs on the same K-shot draw with training seeds seed, seed+100,
seed+200, seed+300; their fitted heads' probabilities averaged. Asks whether the spread between
training draws can be averaged away.

`layers`: the frozen body, then the trained default LoRA body; the head fitted on the mean-pooled
hidden states of each of the six layers, and on the mean of layers 4-6 and of all six. Asks
whether the last layer (the checkpoint's own pooling) is the best place to read features from.
`--frozen-only` skips the LoRA run.

`loss`: the default LoRA run with another pair loss in place of the default's: a one-sided one
(a different-label pair costs only while its cosine is above 0, so opposite embeddings are not
pulled back to orthogonal), and supervised contrastive learning (SupCon, temperature 0.1). Asks
whether the shape of the pair loss is what limits accuracy.

`label_prompts`: the frozen body; a zero-shot classifier (each dev sentence gets the class whose
hand-written description, e.g. "It was great." / "It was terrible.", is nearest in cosine), and
the fitted head with the descriptions added as training rows. Asks how much the label names
alone carry (sst2 and mr only: the descriptions are written for them).

`setfit_pairs`: the body trained on SetFit's own explicitly sampled pairs instead of all pairs of
each batch: each round pairs every training example with one random same-label and one random
other-label example, batches of 16 pairs, the same cosine-MSE loss. `full-setfit` / `lora-setfit`
are SetFit's defaults (20 rounds, one epoch: 80 steps at K=16 x 2; lr 2e-5 for the full body);
`full-200` / `lora-200` keep lorafit's 200 steps and learning rates. Asks whether the pair
sampling of the prototype that led to the contrastive default explains its larger gain.

`bitfit`: the contrastive recipe with only the encoder's biases trained (BitFit, Ben Zaken et al.
2022; 0.1% of MiniLM's weights) at lr 1e-3 and 3e-3, everything else the full-FT defaults. Asks
whether a much smaller trainable set than LoRA's generalises better from 32 labels.

`end_to_end`: SetFit's second phase. The default LoRA run, then its temperature undone and 20
and 50 more steps of cross-entropy through the LoRA body (lr 3e-5) and the fitted head (lr 1e-2)
on the same 32 rows, the dev set evaluated after each. Asks whether tuning body and head together
after the pair loss adds what the fitted head cannot.

`simcse`: unsupervised SimCSE (Gao et al. 2021) on 2,000 unlabelled pool texts before the
default run: 100 steps of batches of 32, each text's second dropout view its positive and the
batch its negatives (temperature 0.05), training the same LoRA weights at lr 3e-4; then the
default run continues from them. Prints the fitted head's dev accuracy on the frozen body and
after SimCSE, then the run's. Asks whether adapting the sentence embedding to the domain's
text first helps.

`fold_validation`: the default run (of `--method`, LoRA unless set) trained from the start on
its 16 training rows per class followed by its 16 validation rows per class, the same steps
and settings: what `train.refit` does after the monitored run (up to the dropout stream, which
the refit restarts from the seed). Asks what the validation labels are worth once a fixed
budget has left them nothing to select. Validation is then in-sample, so only the dev score
counts.

`refit_calibration`: the default run with its refit (`train.refit`), then, on the refit's body,
the head fitted with the ridge as it ships and with the ridge scaled by the rows (train +
validation over train: the per-row penalty of the monitored fit the temperature was fitted on),
each under the monitored run's temperature; the monitored run's own calibrated dev score is
taken before the refit. Asks whether the temperature carries over to the refit model.

All of them use scripts/select_defaults.py's dev sets and K-shot draws (data seeds 1, 2, 3: the
same 16 + 16 examples per class as its runs) and never open a test split. One line per data seed
is printed; nothing is written but the runs' folders under <out>/probes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from recipes_table import DATASETS, QUIET  # noqa: E402
from select_defaults import data_overrides, prepare  # noqa: E402

L2_VALUES = (100.0, 10.0, 1.0, 0.1, 0.01)  # C = 0.01 ... 100
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
UNLABELLED = 2000
PSEUDO_FRACTIONS = (0.1, 0.25, 0.5)
SECOND_STAGE_FRACTION = 0.5
ENSEMBLE_SIZE = 4


def train_and_dev_embeddings(trainer) -> tuple:
    """((embeddings [N, H], labels [N]) of the training set, the same of the dev set)."""
    from lorafit.evaluate import embed_dataset

    return tuple(
        embed_dataset(trainer.model, loader, trainer.accelerator)
        for loader in (trainer.head_fit_loader, trainer.test_loader)
    )


def percent_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100 * (a == b).float().mean().item()


def fitted_head_probabilities(train, x: torch.Tensor, num_classes: int, **fit_options):
    """Class probabilities [N, C] of embeddings x under the head fitted on (embeddings, labels)."""
    from lorafit.objectives import fit_logistic_head

    weight, bias = fit_logistic_head(*train, num_classes, **fit_options)
    return torch.softmax(x @ weight.T + bias, dim=-1)


def fitted_head_accuracy(train, dev, num_classes: int, **fit_options) -> float:
    """Fit the logistic-regression head on (embeddings, labels) `train`; % accuracy on `dev`."""
    x_dev, y_dev = dev
    probabilities = fitted_head_probabilities(train, x_dev, num_classes, **fit_options)
    return percent_equal(probabilities.argmax(-1), y_dev)


def lora_trainer(
    data: list[str], data_seed: int, train_seed: int, run_dir: Path, extra: tuple[str, ...] = ()
):
    """A set-up default LoRA run (MiniLM, eval only at the end) on the given data overrides;
    `extra` overrides come last (e.g. another method)."""
    from lorafit.config import load_config
    from lorafit.trainer import Trainer

    overrides = [
        "model.name_or_path=minilm",
        *data,
        f"data.seed={data_seed}",
        f"train.seed={train_seed}",
        "method.name=lora",
        "train.eval_every=200",
        "train.refit=false",  # the probes measure the monitored run (fold_validation: the refit)
        f"output.dir={run_dir}",
        "output.overwrite=true",
        *QUIET,
        *extra,
    ]
    trainer = Trainer(load_config(None, overrides))
    trainer.setup()
    return trainer


def trainer_for(
    dataset: str,
    folder: Path,
    seed: int,
    out: Path,
    train_seed: int | None = None,
    extra: tuple[str, ...] = (),
):
    """The selection runs' K-shot draw of `seed` (16 + 16 per class) on the dev set."""
    train_seed = seed if train_seed is None else train_seed
    data = [*data_overrides(dataset, folder), "data.k_shot=16"]
    run_dir = out / f"{dataset}-seed{seed}-train{train_seed}"
    return lora_trainer(data, seed, train_seed, run_dir, extra)


def probe_head(dataset: str, folder: Path, seed: int, out: Path, trained: bool) -> str:
    import torch.nn.functional as F

    trainer = trainer_for(dataset, folder, seed, out)  # set up: the frozen body
    cells = []
    if trained:
        cells.append(f"run {100 * trainer.train()['test']['accuracy']:.1f}")
    (x_train, y_train), (x_dev, y_dev) = train_and_dev_embeddings(trainer)
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


BITFIT_LRS = (1e-3, 3e-3)


def probe_bitfit(dataset: str, folder: Path, seed: int, out: Path) -> str:
    cells = []
    for lr in BITFIT_LRS:
        extra = ("method.name=full", f"train.lr={lr:g}")
        trainer = trainer_for(dataset, folder, seed, out / f"bitfit-{lr:g}", extra=extra)
        # BitFit: only the encoder's biases learn (the optimiser skips weights without a grad)
        for name, param in trainer.model.named_parameters():
            param.requires_grad_(name.endswith(".bias") and ".head." not in f".{name}")
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        accuracy = 100 * trainer.train()["test"]["accuracy"]
        cells.append(f"lr {lr:g} ({trained:,} biases): {accuracy:.1f}")
    return " | ".join(cells)


END_TO_END_STEPS = (20, 50)
END_TO_END_LRS = {"body": 3e-5, "head": 1e-2}  # LoRA's 3e-4 / 10: a gentle second phase


def probe_end_to_end(dataset: str, folder: Path, seed: int, out: Path) -> str:
    import torch.nn.functional as F

    from lorafit.evaluate import model_inputs, output_logits

    trainer = trainer_for(dataset, folder, seed, out / "end_to_end")
    summary = trainer.train()  # pair loss, then the fitted, calibrated head
    cells = [f"run {100 * summary['test']['accuracy']:.1f}"]
    model, head = trainer.model, trainer.model.head
    with torch.no_grad():  # undo the temperature: cross-entropy starts from the fitted logits
        temperature = (summary.get("calibration") or {}).get("temperature", 1.0)
        head.weight.mul_(temperature)
        head.bias.mul_(temperature)
    head.requires_grad_(True)
    body = [p for n, p in model.named_parameters() if p.requires_grad and ".head." not in f".{n}"]
    optimizer = torch.optim.AdamW(
        [
            {"params": body, "lr": END_TO_END_LRS["body"]},
            {"params": list(head.parameters()), "lr": END_TO_END_LRS["head"]},
        ],
        weight_decay=0.0,
    )
    loader = torch.utils.data.DataLoader(
        trainer.train_set,
        batch_size=trainer.cfg.train.batch_size,
        shuffle=True,
        collate_fn=trainer.collate,
        generator=torch.Generator().manual_seed(seed),
    )
    step = 0
    while step < max(END_TO_END_STEPS):
        for batch in loader:
            model.train()
            logits = output_logits(model(**model_inputs(batch)))  # [B, C]
            loss = F.cross_entropy(logits.float(), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step in END_TO_END_STEPS:
                accuracy = 100 * trainer._evaluate(trainer.test_loader).metrics["accuracy"]
                cells.append(f"+{step} CE steps: {accuracy:.1f}")
            if step == max(END_TO_END_STEPS):
                break
    return " | ".join(cells)


def unlabelled_rows(trainer, seed: int):
    """UNLABELLED pool rows (a Dataset) outside the run's train/validation draw, shuffled by seed."""
    import dataclasses
    import random

    from lorafit import data as D

    drawn = set(trainer.data.train["text"]) | set(trainer.data.validation["text"])
    whole = dataclasses.replace(trainer.cfg.data, k_shot=None)
    pool = D.load_task_data(whole, trainer.task).train
    rows = [i for i, text in enumerate(pool["text"]) if text not in drawn]
    random.Random(seed).shuffle(rows)
    return pool.select(rows[:UNLABELLED])


SIMCSE = {"steps": 100, "batch_size": 32, "temperature": 0.05, "lr": 3e-4}


def probe_simcse(dataset: str, folder: Path, seed: int, out: Path) -> str:
    import itertools

    import torch.nn.functional as F

    from lorafit import data as D
    from lorafit.evaluate import model_inputs

    trainer = trainer_for(dataset, folder, seed, out / "simcse")
    model = trainer.model
    frozen = fitted_head_accuracy(*train_and_dev_embeddings(trainer), trainer.num_classes)
    rows = D.tokenize(
        unlabelled_rows(trainer, seed),
        trainer.tokenizer,
        trainer.task,
        trainer.cfg.model.max_length,
    )
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=SIMCSE["batch_size"],
        shuffle=True,
        drop_last=True,
        collate_fn=trainer.collate,
        generator=torch.Generator().manual_seed(seed),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA (the head is frozen)
    optimizer = torch.optim.AdamW(trainable, lr=SIMCSE["lr"])
    model.train()
    for batch in itertools.islice(itertools.cycle(loader), SIMCSE["steps"]):
        inputs = model_inputs(batch)  # the pool rows' labels are never read
        # two passes, two dropout masks: each row's other view is its positive, the batch negatives
        first = F.normalize(model(**inputs, return_embedding=True)[1], dim=-1)  # [B, H]
        second = F.normalize(model(**inputs, return_embedding=True)[1], dim=-1)  # [B, H]
        similarity = first @ second.T / SIMCSE["temperature"]  # [B, B]
        loss = F.cross_entropy(similarity, torch.arange(len(similarity)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    adapted = fitted_head_accuracy(*train_and_dev_embeddings(trainer), trainer.num_classes)
    accuracy = 100 * trainer.train()["test"]["accuracy"]
    return f"frozen {frozen:.1f} | after SimCSE {adapted:.1f} | then the default run {accuracy:.1f}"


def embed_rows(trainer, rows) -> tuple:
    """(embeddings [N, H], labels [N]) of normalised rows under the trainer's current body."""
    from lorafit import data as D
    from lorafit.evaluate import embed_dataset

    tokenised = D.tokenize(rows, trainer.tokenizer, trainer.task, trainer.cfg.model.max_length)
    loader = torch.utils.data.DataLoader(  # a private generator: the global RNG stays untouched
        tokenised, batch_size=128, collate_fn=trainer.collate, generator=torch.Generator()
    )
    return embed_dataset(trainer.model, loader, trainer.accelerator)


def most_confident(confidence, predicted, num_classes: int, per_class: int) -> torch.Tensor:
    """Row indices of the per_class most confident predictions of each class."""
    picks = []
    for c in range(num_classes):
        members = (predicted == c).nonzero().flatten()
        picks.append(members[confidence[members].argsort(descending=True)[:per_class]])
    return torch.cat(picks)


def self_training_cells(train, unlabelled, dev, num_classes: int) -> list[str]:
    (x_train, y_train), (x_pool, y_pool) = train, unlabelled
    labelled = (x_train, y_train)
    cells = [f"labelled only {fitted_head_accuracy(labelled, dev, num_classes):.1f}"]
    for fraction in PSEUDO_FRACTIONS:
        confidence, predicted = fitted_head_probabilities(labelled, x_pool, num_classes).max(-1)
        per_class = int(fraction * len(x_pool) / num_classes)
        chosen = most_confident(confidence, predicted, num_classes, per_class)
        labelled = (torch.cat([x_train, x_pool[chosen]]), torch.cat([y_train, predicted[chosen]]))
        pseudo_accuracy = percent_equal(predicted[chosen], y_pool[chosen])
        accuracy = fitted_head_accuracy(labelled, dev, num_classes)
        cells.append(f"+{len(chosen)} pseudo ({pseudo_accuracy:.0f}% right): {accuracy:.1f}")
    return cells


def second_stage_accuracy(trainer, pseudo_rows, pseudo_labels, folder: Path) -> float:
    """A fresh default LoRA run on the labelled rows + pseudo-labelled rows; % dev accuracy."""
    import json

    from lorafit.io import write_text

    names = trainer.label_names
    splits = {
        "train": [
            *zip(trainer.data.train["text"], trainer.data.train["label"]),
            *zip(pseudo_rows["text"], pseudo_labels.tolist()),
        ],
        "validation": zip(trainer.data.validation["text"], trainer.data.validation["label"]),
        "test": zip(trainer.data.test["text"], trainer.data.test["label"]),
    }
    for split, rows in splits.items():
        lines = (json.dumps({"text": text, "label": names[int(y)]}) for text, y in rows)
        write_text(folder / f"{split}.jsonl", "\n".join(lines) + "\n")
    cfg = trainer.cfg
    data = [
        f"model.max_length={cfg.model.max_length}",
        f"data.path={folder}",
        "data.validation_split=validation",
        "data.test_split=test",
    ]
    second = lora_trainer(data, cfg.data.seed, cfg.train.seed, folder / "run")
    return 100 * second.train()["test"]["accuracy"]


def probe_self_train(dataset: str, folder: Path, seed: int, out: Path) -> str:
    trainer = trainer_for(dataset, folder, seed, out)
    unlabelled = unlabelled_rows(trainer, seed)
    lines = []
    for body in ("frozen", "trained"):
        if body == "trained":
            trainer.train()
        train, dev = train_and_dev_embeddings(trainer)
        pool = embed_rows(trainer, unlabelled)
        cells = self_training_cells(train, pool, dev, trainer.num_classes)
        lines.append(f"{body}: " + " | ".join(cells))
    # second stage: the trained body's (last loop pass) most confident half of the pool trains
    # a fresh run
    confidence, predicted = fitted_head_probabilities(train, pool[0], trainer.num_classes).max(-1)
    per_class = int(SECOND_STAGE_FRACTION * len(unlabelled) / trainer.num_classes)
    chosen = most_confident(confidence, predicted, trainer.num_classes, per_class)
    pseudo_accuracy = percent_equal(predicted[chosen], pool[1][chosen])
    accuracy = second_stage_accuracy(
        trainer,
        unlabelled.select(chosen.tolist()),
        predicted[chosen],
        out / f"{dataset}-seed{seed}-second-stage",
    )
    lines.append(
        f"second stage on 32 + {len(chosen)} pseudo ({pseudo_accuracy:.0f}% right): {accuracy:.1f}"
    )
    return " || ".join(lines)


def probe_ensemble(dataset: str, folder: Path, seed: int, out: Path) -> str:
    probabilities, cells = [], []
    for member in range(ENSEMBLE_SIZE):
        trainer = trainer_for(dataset, folder, seed, out, train_seed=seed + 100 * member)
        trainer.train()
        train, (x_dev, y_dev) = train_and_dev_embeddings(trainer)
        probabilities.append(fitted_head_probabilities(train, x_dev, trainer.num_classes))
        single, averaged = (
            percent_equal(p.argmax(-1), y_dev)
            for p in (probabilities[-1], torch.stack(probabilities).mean(0))
        )
        cells.append(f"run {member + 1} {single:.1f}, ensemble of {member + 1} {averaged:.1f}")
    return " | ".join(cells)


@torch.no_grad()
def layer_embeddings(trainer, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean-pooled hidden states [L, N, H] of the encoder's L layers, labels [N]), eval mode."""
    from lorafit.evaluate import model_inputs

    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()  # no dropout: the embeddings the fitted head sees at evaluation
    pooled, labels = [], []
    for batch in loader:
        inputs = model_inputs(batch)
        out = model.encoder(**inputs, output_hidden_states=True)
        mask = inputs["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
        layers = torch.stack(out.hidden_states[1:])  # [L, B, T, H], the embedding layer dropped
        pooled.append((layers * mask).sum(2) / mask.sum(1))  # [L, B, H]
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(pooled, 1).float(), torch.cat(labels)


def layer_cells(trainer) -> list[str]:
    (x_train, y_train), (x_dev, y_dev) = (
        layer_embeddings(trainer, loader)
        for loader in (trainer.head_fit_loader, trainer.test_loader)
    )
    n_layers = len(x_train)
    choices = {f"L{i + 1}": [i] for i in range(n_layers)}
    choices |= {f"mean L{n_layers - 2}-{n_layers}": [n_layers - 3, n_layers - 2, n_layers - 1]}
    choices |= {"mean all": list(range(n_layers))}
    cells = []
    for name, chosen in choices.items():
        train = (x_train[chosen].mean(0), y_train)
        accuracy = fitted_head_accuracy(train, (x_dev[chosen].mean(0), y_dev), trainer.num_classes)
        cells.append(f"{name} {accuracy:.1f}")
    return cells


def probe_layers(dataset: str, folder: Path, seed: int, out: Path, frozen_only: bool) -> str:
    trainer = trainer_for(dataset, folder, seed, out)
    frozen = layer_cells(trainer)
    if frozen_only:
        return f"frozen: {' | '.join(frozen)}"
    summary = trainer.train()
    trained = layer_cells(trainer)
    run = 100 * summary["test"]["accuracy"]
    return f"frozen: {' | '.join(frozen)}\n  trained (run {run:.1f}): {' | '.join(trained)}"


def one_sided_pair_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The default pair loss, but a different-label pair costs only while its cosine is > 0."""
    import torch.nn.functional as F

    z = F.normalize(embeddings.float(), dim=-1)  # [B, H]
    cosine = z @ z.T  # [B, B]
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    errors = torch.where(same, (cosine - 1) ** 2, cosine.clamp(min=0) ** 2)
    means = [errors[upper & m].mean() for m in (same, ~same) if (upper & m).any()]
    return torch.stack(means).mean() if means else embeddings.sum() * 0.0


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """SupCon (Khosla et al. 2020): each anchor's same-label examples against all others."""
    import torch.nn.functional as F

    z = F.normalize(embeddings.float(), dim=-1)  # [B, H]
    logits = z @ z.T / temperature  # [B, B]
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=-1, keepdim=True)  # [B, B]
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    anchors = positive.any(-1)
    if not anchors.any():
        return embeddings.sum() * 0.0
    per_anchor = log_prob.masked_fill(~positive, 0).sum(-1) / positive.sum(-1).clamp(min=1)
    return -per_anchor[anchors].mean()


PAIR_LOSSES = {"one_sided": one_sided_pair_loss, "supcon": supervised_contrastive_loss}


def probe_loss(dataset: str, folder: Path, seed: int, out: Path) -> str:
    import lorafit.trainer

    cells = []
    for name, loss in PAIR_LOSSES.items():
        with mock.patch.object(lorafit.trainer, "pair_cosine_loss", loss):
            trainer = trainer_for(dataset, folder, seed, out / name)
            accuracy = 100 * trainer.train()["test"]["accuracy"]
        cells.append(f"{name} {accuracy:.1f}")
    return " | ".join(cells)


TOKEN_DROPOUT = 0.15


def token_dropout_view(attention_mask: torch.Tensor, rate: float) -> torch.Tensor:
    """attention_mask [B, T] with each real token but the first and last masked out at `rate`."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = attention_mask.sum(1, keepdim=True) - 1  # [B, 1] the [SEP] of right-padded rows
    ends = (positions[None, :] == 0) | (positions[None, :] == last)  # [B, T]
    keep = (torch.rand(attention_mask.shape, device=attention_mask.device) >= rate) | ends
    return attention_mask * keep.to(attention_mask.dtype)


def probe_augment(dataset: str, folder: Path, seed: int, out: Path) -> str:
    import lorafit.trainer
    from lorafit.evaluate import model_inputs

    def compute_loss(self, batch: dict) -> torch.Tensor:
        # each batch of B examples becomes 2B: the examples and a token-dropout view of each
        inputs = model_inputs(batch)
        view = {
            **inputs,
            "attention_mask": token_dropout_view(inputs["attention_mask"], TOKEN_DROPOUT),
        }
        both = {k: torch.cat([inputs[k], view[k]]) for k in inputs}
        _, pooled = self.model(**both, return_embedding=True)  # [2B, H]
        labels = batch["labels"]
        return lorafit.trainer.pair_cosine_loss(pooled, torch.cat([labels, labels]))

    with mock.patch.object(lorafit.trainer.Trainer, "compute_loss", compute_loss):
        trainer = trainer_for(dataset, folder, seed, out / "augment")
        accuracy = 100 * trainer.train()["test"]["accuracy"]
    return f"token-dropout views {accuracy:.1f}"


# SetFit's own pair sampling (setfit < 1.0, `sentence_pairs_generation`): in each round every
# training example is paired with one random same-label example (target cosine 1) and one random
# other-label example (target 0); the pairs are shuffled into batches of 16 pairs (32 encodings).
# SetFit's defaults: 20 rounds, one epoch (80 steps at K=16 x 2 classes), body lr 2e-5, 10% warmup.
SETFIT_ROUNDS = 20
SETFIT_PAIRS_PER_STEP = 16
SETFIT_VARIANTS = {  # name -> (overrides, steps; None: one epoch of SETFIT_ROUNDS rounds)
    "full-setfit": (("method.name=full", "train.lr=2e-5"), None),
    "lora-setfit": (("method.name=lora", "train.lr=3e-4"), None),
    "full-200": (("method.name=full", "train.lr=5e-5"), 200),  # lorafit's budget and lr
    "lora-200": (("method.name=lora", "train.lr=3e-4"), 200),
}


def setfit_pairs(labels: list[int], seed: int, rounds: int) -> list[tuple[int, int, float]]:
    """(anchor row, partner row, target cosine), shuffled: `rounds` rounds over the rows."""
    import random

    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    pairs = []
    for _ in range(rounds):
        for i, y in enumerate(labels):
            others = [j for j, z in enumerate(labels) if z != y]
            pairs.append((i, rng.choice(by_label[y]), 1.0))  # may pair a row with itself
            pairs.append((i, rng.choice(others), 0.0))
    rng.shuffle(pairs)
    return pairs


def probe_setfit_pairs(dataset: str, folder: Path, seed: int, out: Path, variants) -> str:
    import math

    import torch.nn.functional as F

    import lorafit.trainer

    def encode(self, rows: list[int]) -> torch.Tensor:
        texts = [self.data.train["text"][i] for i in rows]
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.cfg.model.max_length,
            return_tensors="pt",
        )
        _, pooled = self.model(**tokens, return_embedding=True)  # [P, H]
        return pooled

    def compute_loss(self, batch: dict) -> torch.Tensor:
        # the loop's own batch only ticks the step: the next SETFIT_PAIRS_PER_STEP pairs train
        step_pairs = [next(self.setfit_pair_iter) for _ in range(SETFIT_PAIRS_PER_STEP)]
        anchors, partners, targets = zip(*step_pairs)
        cosine = F.cosine_similarity(encode(self, anchors), encode(self, partners))  # [P]
        return F.mse_loss(cosine.float(), torch.tensor(targets))

    rows = 16 * (4 if dataset == "ag_news" else 2)  # K=16 per class
    cells = []
    with mock.patch.object(lorafit.trainer.Trainer, "compute_loss", compute_loss):
        for name in variants:
            overrides, steps = SETFIT_VARIANTS[name]
            # 2 pairs per row and round
            rounds = SETFIT_ROUNDS if steps is None else math.ceil(steps * 16 / (2 * rows))
            steps = steps or math.ceil(2 * rounds * rows / SETFIT_PAIRS_PER_STEP)
            extra = (*overrides, f"train.steps={steps}")
            trainer = trainer_for(dataset, folder, seed, out / f"setfit-{name}", extra=extra)
            if len(trainer.data.train) != rows:
                raise SystemExit(f"setfit_pairs: expected {rows} training rows")
            labels = [int(y) for y in trainer.data.train["label"]]
            trainer.setfit_pair_iter = iter(setfit_pairs(labels, seed, rounds))
            accuracy = 100 * trainer.train()["test"]["accuracy"]
            cells.append(f"{name} ({steps} steps) {accuracy:.1f}")
    return " | ".join(cells)


# Label descriptions (class 0, class 1) for the two binary sentiment sets: a plain label name, and
# hand-written templates. Written by a person for these datasets: not something a default can do.
LABEL_PROMPTS = (
    ("negative", "positive"),
    ("This is negative.", "This is positive."),
    ("It was terrible.", "It was great."),
    ("a bad movie", "a good movie"),
    ("I hated it.", "I loved it."),
)
PROMPT_COPIES = 4  # each description's weight as extra head-fit rows


def probe_label_prompts(dataset: str, folder: Path, seed: int, out: Path) -> str:
    import datasets
    import torch.nn.functional as F

    if dataset not in ("sst2", "mr"):
        raise SystemExit("label_prompts: the descriptions are written for sst2 and mr only")
    trainer = trainer_for(dataset, folder, seed, out)  # set up: the frozen body
    train, (x_dev, y_dev) = train_and_dev_embeddings(trainer)
    cells = [f"head on 32 examples {fitted_head_accuracy(train, (x_dev, y_dev), 2):.1f}"]
    for prompts in LABEL_PROMPTS:
        rows = datasets.Dataset.from_dict({"text": list(prompts), "label": [0, 1], "row": [0, 1]})
        x_prompts, y_prompts = embed_rows(trainer, rows)
        # zero-shot: the class whose description is nearest in cosine
        nearest = (F.normalize(x_dev, dim=-1) @ F.normalize(x_prompts, dim=-1).T).argmax(-1)
        # few-shot: the descriptions as extra training rows of the fitted head
        extended = (
            torch.cat([train[0], x_prompts.repeat(PROMPT_COPIES, 1)]),
            torch.cat([train[1], y_prompts.repeat(PROMPT_COPIES)]),
        )
        with_prompts = fitted_head_accuracy(extended, (x_dev, y_dev), 2)
        cells.append(
            f"{prompts[1]!r}: zero-shot {percent_equal(nearest, y_dev):.1f}, "
            f"head + descriptions {with_prompts:.1f}"
        )
    return " | ".join(cells)


def probe_fold_validation(
    dataset: str, folder: Path, seed: int, out: Path, method: str = "lora"
) -> str:
    import datasets

    import lorafit.data as D

    load = D.load_task_data

    def train_on_both(cfg, task):  # the 16 validation rows per class join the 16 training rows
        data = load(cfg, task)
        data.train = datasets.concatenate_datasets([data.train, data.validation])
        return data

    with mock.patch.object(D, "load_task_data", train_on_both):
        extra = (f"method.name={method}",)
        trainer = trainer_for(dataset, folder, seed, out / f"fold_validation-{method}", extra=extra)
    rows = len(trainer.data.train)
    return f"trained on {rows} rows: {100 * trainer.train()['test']['accuracy']:.1f}"


def probe_refit_calibration(
    dataset: str, folder: Path, seed: int, out: Path, method: str = "lora"
) -> str:
    """The default run with its refit; on the refit's body, the head fitted with the ridge as
    is (what ships) and scaled with the rows (per-row penalty as in the monitored fit the
    temperature came from), each under the monitored temperature. Dev ECE/NLL x100 and accuracy;
    "monitored" is the monitored run's own calibrated dev score, taken before the refit."""
    from lorafit.evaluate import evaluate_logits
    from lorafit.objectives import HEAD_L2, fit_logistic_head

    extra = (f"method.name={method}", "train.refit=true")
    trainer = trainer_for(dataset, folder, seed, out / f"refit_calibration-{method}", extra=extra)
    monitored_rows = len(trainer.train_set)
    calibrate = trainer._calibrate
    monitored = {}

    def calibrate_and_score():  # the monitored model, its temperature folded in: dev metrics
        result = calibrate()
        monitored.update(trainer._evaluate(trainer.test_loader).metrics)
        return result

    trainer._calibrate = calibrate_and_score
    summary = trainer.train()
    temperature = summary["calibration"]["temperature"]
    train, (x_dev, y_dev) = train_and_dev_embeddings(trainer)  # the refit's rows and body
    scale = len(train[1]) / monitored_rows

    def scored(l2: float, t: float) -> str:
        weight, bias = fit_logistic_head(*train, trainer.num_classes, l2=l2)
        logits = ((x_dev.double() @ weight.double().T + bias.double()) / t).float().numpy()
        m = evaluate_logits(logits, y_dev.numpy(), trainer.num_classes, trainer.cfg.eval).metrics
        return f"acc {100 * m['accuracy']:.1f} ECE {100 * m['ece']:.1f} NLL {100 * m['nll']:.1f}"

    return (
        f"T {temperature:.2f}, rows {monitored_rows} -> {len(train[1])} | monitored: acc "
        f"{100 * monitored['accuracy']:.1f} ECE {100 * monitored['ece']:.1f} NLL "
        f"{100 * monitored['nll']:.1f} | refit, ridge as is: {scored(HEAD_L2, temperature)} "
        f"| refit, ridge x{scale:g}: {scored(HEAD_L2 * scale, temperature)} "
        f"| run's own test ECE {100 * summary['test']['ece']:.1f}"
    )


PROBES = {
    "head": probe_head,
    "interpolate": probe_interpolate,
    "self_train": probe_self_train,
    "ensemble": probe_ensemble,
    "layers": probe_layers,
    "loss": probe_loss,
    "augment": probe_augment,
    "label_prompts": probe_label_prompts,
    "setfit_pairs": probe_setfit_pairs,
    "bitfit": probe_bitfit,
    "end_to_end": probe_end_to_end,
    "simcse": probe_simcse,
    "fold_validation": probe_fold_validation,
    "refit_calibration": probe_refit_calibration,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("probe", choices=PROBES)
    p.add_argument("--datasets", nargs="+", default=["sst2", "mr"], choices=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--out", default=str(ROOT / "runs" / "select"))
    p.add_argument("--frozen-only", action="store_true", help="layers: skip the LoRA run")
    p.add_argument("--trained", action="store_true", help="head: on a trained LoRA body")
    p.add_argument(
        "--method", default="lora", help="fold_validation, refit_calibration: the method to run"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(SETFIT_VARIANTS),
        choices=SETFIT_VARIANTS,
        help="setfit_pairs: which variants to run",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    folders = prepare(out)
    probe = PROBES[args.probe]
    for dataset in args.datasets:
        for seed in args.seeds:
            extra = {
                "layers": {"frozen_only": args.frozen_only},
                "head": {"trained": args.trained},
                "setfit_pairs": {"variants": args.variants},
                "fold_validation": {"method": args.method},
                "refit_calibration": {"method": args.method},
            }.get(args.probe, {})
            line = probe(dataset, folders[dataset], seed, out / "probes", **extra)
            print(f"{dataset} seed {seed}: {line}", flush=True)


if __name__ == "__main__":
    main()
