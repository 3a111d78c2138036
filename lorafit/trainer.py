"""The training recipe: setup -> train (with evaluation and model selection) -> test -> save.

Read top to bottom. One `Trainer` holds the run; `train(cfg)` is the entry point used by the CLI,
sweeps and tests. Under `accelerate launch` every process runs this same code: the model is
wrapped for DDP by `accelerator.prepare`, each rank takes its own share of the training batches,
and only the main process writes files, logs and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorafit import data as D
from lorafit import distributed as dist
from lorafit import methods as Meth
from lorafit import metrics as M
from lorafit import recipes
from lorafit.calibration import calibration_line, fit_temperature
from lorafit.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lorafit.config import (
    LOWER_IS_BETTER,
    RunConfig,
    TrainConfig,
    calibration_for,
    objective_for,
    refit_for,
    selection_metric_for,
)
from lorafit.distributed import make_accelerator
from lorafit.errors import ConfigError, TrainingError
from lorafit.evaluate import (
    EvalResult,
    causal_lm_logits,
    confidence_intervals,
    embed_dataset,
    evaluate,
    evaluate_logits,
    model_inputs,
    output_logits,
    scored_positions,
)
from lorafit.io import append_jsonl, read_jsonl, write_json, write_text
from lorafit.models import resolve_model_source
from lorafit.objectives import fit_logistic_head, pair_cosine_loss
from lorafit.rundir import (
    RunDir,
    changed_settings,
    check_run_dir,
    environment_info,
    flat_settings,
    plot_learning_curve,
    prepare_run_dir,
    truncate_metrics,
)

logger = logging.getLogger(__name__)

# A refit whose training-sample accuracy ends more than this below the monitored run's (10
# points) is reported as diverged (both trained on those rows; a healthy refit is level or better).
REFIT_WARN_DROP = 0.1

# Test hook: SIGKILL this process after the given optimisation step (checkpoint written first),
# so the tests can check that `resume=true` continues to the same result after a hard kill.
FAULT_ENV = "LORAFIT_FAULT_AT_STEP"


class StepBatchSampler:
    """Micro-batch indices as a pure function of (seed, batch number).

    The index stream is a concatenation of seeded permutations of the training set, cut into
    batches of `batch_size`; rank r of W takes global batches r, r+W, r+2W, ... Resuming at batch
    b needs no saved sampler state, so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank=0, world=1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def batch(self, global_batch: int) -> list[int]:
        first = global_batch * self.batch_size
        indices, epoch_cache = [], {}
        for pos in range(first, first + self.batch_size):
            epoch, offset = divmod(pos, self.n)
            if epoch not in epoch_cache:
                epoch_cache[epoch] = self._permutation(epoch)
            indices.append(int(epoch_cache[epoch][offset]))
        return indices

    def __iter__(self):
        for local in range(self.start, self.stop):
            yield self.batch(local * self.world + self.rank)

    def __len__(self) -> int:
        return self.stop - self.start


class ClassPairBatchSampler(StepBatchSampler):
    """Micro-batches of ceil(batch_size / 2) same-class pairs (for an odd size, the last pair
    gives one example).

    For the contrastive objective with many classes, where a random batch of 8 from 14 classes
    holds 1.5 same-label pairs on average, so most steps teach only "apart". Each epoch shuffles
    every class and cuts it into pairs (an odd class leaves one example out, another each
    epoch), then deals each batch its pairs from different classes where it can (`_epoch_pairs`);
    still a pure function of (seed, batch number), so resuming and rank sharding work as above.
    """

    def __init__(self, labels, batch_size: int, seed: int, start: int, stop: int, rank=0, world=1):
        super().__init__(len(labels), batch_size, seed, start, stop, rank, world)
        labels = np.asarray(labels)
        self.classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.pairs_per_batch = _pairs_per_batch(batch_size)
        pairs_per_epoch = _same_class_pairs([len(members) for members in self.classes])
        if pairs_per_epoch < self.pairs_per_batch:
            raise ConfigError(
                f"train.batch_sampling=class_pairs: the training set makes {pairs_per_epoch} "
                f"same-class pairs, fewer than one batch needs ({self.pairs_per_batch}); "
                "set train.batch_sampling=random"
            )
        self.batches_per_epoch = pairs_per_epoch // self.pairs_per_batch
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def _epoch_pairs(self, epoch: int) -> list[np.ndarray]:
        """The epoch's pairs in dealing order, batch after batch. A batch takes its pairs from
        different classes while enough classes have pairs left (so it holds different-label
        pairs too), drawing classes in proportion to the pairs they have left."""
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            left = []  # per class: its shuffled pairs not dealt yet
            for members in self.classes:
                shuffled = rng.permutation(members)
                left.append([shuffled[i : i + 2] for i in range(0, len(shuffled) - 1, 2)])
            dealt = []
            for _ in range(self.batches_per_epoch):
                batch: list[np.ndarray] = []
                while len(batch) < self.pairs_per_batch:
                    counts = np.array([len(pairs) for pairs in left], dtype=float)
                    take = min(self.pairs_per_batch - len(batch), int(np.count_nonzero(counts)))
                    classes = rng.choice(
                        len(left), size=take, replace=False, p=counts / counts.sum()
                    )
                    batch += [left[c].pop() for c in classes]
                dealt += batch
            self._cache = (epoch, dealt)
        return self._cache[1]

    def batch(self, global_batch: int) -> list[int]:
        epoch, position = divmod(global_batch, self.batches_per_epoch)
        first = position * self.pairs_per_batch
        dealt = self._epoch_pairs(epoch)[first : first + self.pairs_per_batch]
        return [int(i) for pair in dealt for i in pair][: self.batch_size]


class LengthGroupedBatchSampler(StepBatchSampler):
    """Random batches of rows of similar length: less padding, nearly every row every epoch.

    Each epoch draws a seeded permutation and keeps its first `batch_size x (n // batch_size)`
    rows (the n % batch_size left over differ from epoch to epoch). It cuts them into chunks of
    `LENGTH_GROUP_BATCHES x world` batches, sorts each chunk by length, cuts it into batches and
    shuffles the order of those batches (after the Hugging Face Trainer's `group_by_length`, which
    leaves each chunk in length order: on a training set of a few hundred rows one chunk is the
    whole epoch, and the epoch would run from the longest rows to the shortest). Still a pure
    function of (seed, batch number), sharded like `StepBatchSampler`.
    """

    def __init__(self, lengths, batch_size: int, seed: int, start: int, stop: int, rank=0, world=1):
        super().__init__(len(lengths), batch_size, seed, start, stop, rank, world)
        if len(lengths) < batch_size:
            raise ConfigError(
                f"train.batch_sampling=by_length: {len(lengths)} training rows make no batch of "
                f"train.batch_size={batch_size}; lower train.batch_size or use "
                "train.batch_sampling=random"
            )
        self.lengths = np.asarray(lengths)
        self.batches_per_epoch = len(lengths) // batch_size
        self.chunk_batches = LENGTH_GROUP_BATCHES * world
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            rows = rng.permutation(self.n)[: self.batches_per_epoch * self.batch_size]
            batches: list[np.ndarray] = []
            for first in range(0, len(rows), self.chunk_batches * self.batch_size):
                chunk = rows[first : first + self.chunk_batches * self.batch_size]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]  # longest first
                cut = [
                    chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
                ]
                batches += [cut[i] for i in rng.permutation(len(cut))]
            self._cache = (epoch, batches)
        return self._cache[1]

    def batch(self, global_batch: int) -> list[int]:
        epoch, position = divmod(global_batch, self.batches_per_epoch)
        return [int(i) for i in self._epoch_batches(epoch)[position]]


# Global batches per length-sorted chunk: wide enough for similar lengths, narrow enough that
# the order stays random at the scale of an epoch.
LENGTH_GROUP_BATCHES = 50


@dataclass
class Selection:
    """Model selection state: which evaluation was best, and how long since it improved."""

    metric: str
    higher_is_better: bool
    tie_breaker: str
    best_value: float | None = None
    best_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0

    def update(self, step: int, value: float, loss: float) -> bool:
        """Record an evaluation; True if it is the new best."""
        if self.best_value is None:
            improved = True
        else:
            delta = value - self.best_value if self.higher_is_better else self.best_value - value
            improved = delta > 1e-12 or (
                abs(delta) <= 1e-12 and self.tie_breaker == "loss" and loss < self.best_loss
            )
        if improved:
            self.best_value, self.best_loss, self.best_step = value, loss, step
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        return improved

    def state(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("best_value", "best_loss", "best_step", "evals_since_best")
        }

    def load(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class EMA:
    """Exponential moving average of the trainable weights (evaluated and saved when enabled)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        self.is_main = self.accelerator.is_main_process

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        from accelerate.utils import set_seed

        self.run = RunDir(Path(cfg.output.dir))
        # A bad output.dir is refused now; an old run is replaced only once data and model load.
        if self.is_main:
            check_run_dir(cfg.output.dir, cfg.output.overwrite, cfg.train.resume)
            if cfg.train.resume and self.run.config.exists():
                changed = changed_settings(self.run.root, cfg)
                if changed:
                    raise ConfigError(
                        f"train.resume: {self.run.root} was trained with other settings "
                        f"({'; '.join(changed[:3])}); resume with the same ones, or start a new "
                        "run (another output.dir, or output.overwrite=true)"
                    )
        set_seed(cfg.train.seed)
        resolve_model_source(cfg.model)  # a wrong model.name_or_path fails before the data loads

        # data: normalised columns, K-shot sampled per seed, then tokenised
        self.task = cfg.model.task if cfg.model.task != "auto" else D.infer_task(cfg.data)
        # auto settings are known once the task is; both refuse mixes that cannot work
        self.objective = objective_for(cfg.train, self.task)
        self.calibration = calibration_for(cfg.train, self.task)
        selection_metric = selection_metric_for(cfg.train, self.task)
        # hashed before the read: an edit in between makes the hash disagree, never agree
        self.data_sha256 = D.data_files_sha256(cfg.data)  # a sweep refuses to mix edited data
        self.data = D.load_task_data(cfg.data, self.task)
        self.label_names = self.data.label_names
        # The loop runs train.steps, raised to cover train.min_passes passes over a large
        # training set; config.yaml keeps the settings as given (the floor is recomputed).
        steps = budget_steps(cfg.train, acc.num_processes, len(self.data.train), self.task)
        self.train_cfg = dataclasses.replace(cfg.train, steps=steps)
        self.num_classes = len(self.label_names) if self.task == "classification" else None

        # model + method (the tokenizer comes with the model: aliases resolve in one place)
        built = Meth.build_model(
            cfg.model,
            Meth.for_training(cfg.method, self.train_cfg),
            self.task,
            num_labels=self.num_classes,
            label_names=self.label_names,
            # QLoRA: each rank quantises its copy onto its own device (never device_map="auto")
            device_map=dist.quantized_device_map(acc) if cfg.method.name == "qlora" else None,
            text_columns=(None if cfg.data.text == "auto" else cfg.data.text, cfg.data.text_pair),
        )
        self.model, self.tokenizer, self.model_info = built.model, built.tokenizer, built.info
        if cfg.train.gradient_checkpointing:
            _enable_gradient_checkpointing(self.model)
        self.contrastive = self.objective == "contrastive"
        if self.contrastive:
            self._freeze_head_for_contrastive()

        tok = lambda ds, split: D.tokenize(  # noqa: E731
            ds, self.tokenizer, self.task, cfg.model.max_length, split
        )
        self.train_set = tok(self.data.train, "train")
        self.num_train = len(self.train_set)
        self.validation_set = tok(self.data.validation, "validation")
        self.test_set = tok(self.data.test, "test")
        # A fixed sample of the training set, evaluated like validation: the gap between the two
        # curves is the overfitting signal.
        rng = np.random.default_rng(cfg.train.seed)
        sample = rng.permutation(len(self.train_set))[: cfg.train.train_eval_size]
        self.train_sample = self.train_set.select(sorted(sample.tolist()))

        self.collate = D.Collator(self.tokenizer, self.task)
        self.train_sample_loader, self.validation_loader, self.test_loader = (
            self._eval_loader(self.train_sample),
            self._eval_loader(self.validation_set),
            self._eval_loader(self.test_set),
        )
        self.fit_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # set by _fit_head

        # optimiser over trainable parameters only; weight decay and LR groups by methods.py
        groups = Meth.param_groups(self.model, cfg.train, cfg.method)
        self.optimizer = _make_optimizer(groups, cfg)
        self.scheduler = _make_scheduler(self.optimizer, self.train_cfg)

        (
            self.model,
            self.optimizer,
            self.train_sample_loader,
            self.validation_loader,
            self.test_loader,
        ) = acc.prepare(
            self.model,
            self.optimizer,
            self.train_sample_loader,
            self.validation_loader,
            self.test_loader,
        )
        self._prepare_head_fit()
        self.unwrapped = acc.unwrap_model(self.model)
        self.update_ranks = Meth.rank_update_hook(self.unwrapped)
        # Names without wrapper prefixes; under ZeRO-3 / FSDP these are shards, read and written
        # through dist.read_full / dist.write_full.
        self.trainable = {
            dist.clean_name(n): p for n, p in self.unwrapped.named_parameters() if p.requires_grad
        }
        self.sharded = dist.is_sharded(acc)
        self.ema = EMA(self.trainable, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.refit = refit_for(cfg, self.task)
        if self.refit and dist.is_deepspeed(acc):  # its optimiser lives inside the engine
            if cfg.train.refit:
                raise ConfigError(
                    "train.refit restarts the optimiser, which a DeepSpeed run cannot do here; "
                    "set train.refit=false"
                )
            self.refit = False  # the default: the monitored run is tested, as without a refit
            self._print("refit: off under DeepSpeed (train.refit); the monitored run is tested")
        # the refit starts over from these (the seeded initialisation, before any resume): a
        # CPU copy of the trainable weights, and the fp16 loss scaler's starting state
        self.initial_weights = (
            dist.read_full(acc, self.model, self.trainable) if self.refit else None
        )
        self.initial_scaler = (
            acc.scaler.state_dict() if self.refit and acc.scaler is not None else None
        )
        self.refit_summary: dict | None = None  # set by _refit
        self.monitored_selected: str | None = None  # "best" / "last", kept by _refit

        self.selection = Selection(
            metric=selection_metric,
            higher_is_better=selection_metric not in LOWER_IS_BETTER,
            tie_breaker=cfg.train.early_stopping.tie_breaker,
        )
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.start_step = 0
        self.elapsed_before = 0.0  # wall and evaluation seconds of the runs this one resumes
        self.eval_seconds_before = 0.0
        self.stopped_early = False
        if cfg.train.resume:
            self._resume()

        if self.is_main:
            prepare_run_dir(cfg.output.dir, cfg.output.overwrite, cfg.train.resume)
        acc.wait_for_everyone()
        if self.is_main:
            write_text(self.run.config, cfg.to_yaml())
            if self.label_names is not None:
                D.save_label_map(self.run.label_map, self.label_names)
        if cfg.output.report_to:
            acc.init_trackers("lorafit", config=_tracker_config(cfg))
        self._print(
            f"{self.task} | {cfg.method.name} on {cfg.model.name_or_path} | "
            f"train {len(self.train_set)}, validation {len(self.validation_set)}, test {len(self.test_set)} | "
            f"trainable {self.model_info['trainable_params']:,} / {self.model_info['total_params']:,} params"
        )
        # where each split came from; its warnings (leakage...) were logged when the data loaded
        self._print(f"data: {self.data.source}")
        note = dist.backend_note(acc)
        if note:
            self._print(note)
        world, num_train = acc.num_processes, len(self.train_set)
        for note in (
            budget_note(cfg.train, self.train_cfg.steps, world, num_train, self.task),
            batch_note(cfg.train, world, num_train),
        ):
            if note:
                self._print(note)
        label_counts = _label_counts(self.train_set, self.num_classes)
        self.batch_sampling = batch_sampling_for(cfg.train, self.contrastive, label_counts)
        note = pairs_note(cfg.train, self.contrastive, self.batch_sampling, label_counts)
        if note:
            self._print(note)

    def _eval_loader(self, dataset) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            # longest first: 2-2.4x fewer padded tokens on SST-2 / AG News than file order;
            # results come back in row order (evaluate), so nothing else sees the order
            dataset.select(D.longest_first([len(ids) for ids in dataset["input_ids"]])),
            batch_size=self.cfg.eval.batch_size,
            shuffle=False,
            collate_fn=self.collate,
            # A private generator: creating loader iterators must not draw from the global RNG,
            # or a resumed run would see other dropout masks than an uninterrupted one.
            generator=torch.Generator(),
        )

    def _prepare_head_fit(self) -> None:
        """Contrastive: the head is fitted on the embeddings of the training set (a fixed
        stratified sample of train.head_fit_size rows when larger: every fit embeds them all)."""
        self.head_fit_loader = None
        self.train_sample_in_fit = False
        if not self.contrastive:
            return
        rows = D.head_fit_sample(self.train_set, self.cfg.train.head_fit_size, self.cfg.train.seed)
        self.head_fit_loader = self.accelerator.prepare(self._eval_loader(rows))
        # when the fit embeds every train-sample row, the sample's logits are the fitted head
        # on those embeddings (_train_sample_metrics): one forward pass fewer per evaluation
        fit_rows = rows["row"]
        self.train_sample_in_fit = len(set(fit_rows)) == len(fit_rows) and set(
            self.train_sample["row"]
        ) <= set(fit_rows)

    def _freeze_head_for_contrastive(self) -> None:
        """The pair loss trains the body only; the head is fitted (`_fit_head`), never stepped."""
        self.model.head.requires_grad_(False)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ConfigError(
                f"train.objective=contrastive trains the body, and method.name="
                f"{self.cfg.method.name} leaves none of it trainable; use train.objective=ce"
            )

    def _fit_head(self) -> None:
        """Contrastive objective: refit the head on the body's embeddings of the training set."""
        if not self.contrastive:
            return
        embeddings, labels, rows = embed_dataset(
            self.model, self.head_fit_loader, self.accelerator, with_rows=True
        )
        weight, bias = fit_logistic_head(embeddings, labels, self.num_classes)  # [C, H], [C]
        dist.write_full(
            self.accelerator,
            self.model,
            self._head_params(),
            {"head.weight": weight, "head.bias": bias},
        )
        self.fit_embeddings = (embeddings, rows)  # [N, H], [N]

    def _train_sample_metrics(self) -> dict[str, float]:
        """Metrics of the fixed training sample (the train side of the gap).

        Contrastive: `_fit_head` has just embedded these rows with the current body, so their
        logits are the head applied to those embeddings (in eval mode the head is a plain linear
        layer on the pooled embedding). The same metrics, up to float rounding, without a
        second forward pass over the sample.
        """
        if not self.train_sample_in_fit:
            return self._evaluate(self.train_sample_loader).metrics
        embeddings, rows = self.fit_embeddings
        position = {row: i for i, row in enumerate(rows.tolist())}
        take = torch.tensor([position[row] for row in self.train_sample["row"]])
        head = dist.read_full(self.accelerator, self.model, self._head_params())  # as calibrated
        weight, bias = head["head.weight"].float(), head["head.bias"].float()  # [C, H], [C]
        logits = embeddings[take] @ weight.T + bias  # [N, C]
        labels = np.asarray(self.train_sample["labels"])
        result = evaluate_logits(logits.numpy(), labels, self.num_classes, self.cfg.eval)
        self.eval_seconds += result.seconds
        return result.metrics

    def _head_params(self) -> dict[str, torch.nn.Parameter]:
        """The linear head's parameters by their names in the model ("head.weight", "head.bias");
        {} for a causal LM, which has none."""
        if self.task != "classification":
            return {}
        return {f"head.{n}": p for n, p in self.unwrapped.head.named_parameters()}

    def _calibrate(self) -> dict | None:
        """Fit a temperature on validation and fold it into the head: logits / T everywhere on.

        Predictions do not change (T > 0 keeps every argmax); probabilities, NLL, Brier and ECE
        of the final evaluations, the saved model and its exports do."""
        if self.calibration != "temperature":
            return None
        val = self._evaluate(self.validation_loader, keep=True)
        # [N, C], [N]: gathered on every rank
        logits, labels = val.per_example["logits"], val.per_example["label"]
        temperature = fit_temperature(logits, labels)
        self._fold_temperature(temperature)
        before = {k: val.metrics[k] for k in CALIBRATION_METRICS}  # the raw head's evaluation
        after = _calibration_metrics(
            logits / temperature, labels, self.num_classes, self.cfg.eval.ece_bins
        )
        self._print(
            calibration_line(
                temperature, len(labels), before["ece"], after["ece"], val.metrics["accuracy"]
            )
        )
        return {
            "method": "temperature",
            "temperature": temperature,
            "validation_before": before,
            "validation_after": after,
        }

    def _fold_temperature(self, temperature: float) -> None:
        """Divide the head's weight and bias by `temperature`: logits / T from now on."""
        head = self._head_params()
        current = dist.read_full(self.accelerator, self.model, head)
        with torch.no_grad():  # a cross-entropy head is a trainable leaf
            dist.write_full(
                self.accelerator, self.model, head, {k: v / temperature for k, v in current.items()}
            )

    def _resume(self) -> None:
        checkpoints = list_checkpoints(self.run.checkpoints)
        if not checkpoints:
            self._print("resume: no checkpoint found, starting from step 0")
            return
        acc = self.accelerator
        ckpt = load_checkpoint(checkpoints[-1], rank=acc.process_index)
        trained_on = ckpt["trainer"].get("data_sha256")  # absent before 2026-12
        if trained_on is not None and trained_on != self.data_sha256:
            changed = D.changed_data_files(trained_on, self.data_sha256)
            raise ConfigError(
                f"train.resume: {checkpoints[-1]} was trained on other data ({changed} of "
                f"{self.cfg.data.path}); restore the file, or start a new run (another "
                "output.dir, or output.overwrite=true)"
            )
        if ckpt["num_ranks"] != acc.num_processes:
            # rank r of W takes global batches r, r+W, ...: another W would replay or skip
            # batches, and the step budget and the per-rank dropout streams depend on W too
            raise ConfigError(
                f"train.resume: {checkpoints[-1]} was written by {ckpt['num_ranks']} process(es), "
                f"this launch has {acc.num_processes}; resume with {ckpt['num_ranks']} "
                "process(es), or start a new run (another output.dir, or output.overwrite=true)"
            )
        if self.sharded:
            dist.write_full(acc, self.model, self.trainable, ckpt["trainable"])
        else:
            Meth.load_trainable_state_dict(self.unwrapped, ckpt["trainable"])
        if ckpt["optimizer"] is not None and not self.sharded:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        else:
            self._print("resume: no optimizer state in the checkpoint; the optimizer restarts")
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(*ckpt["rng"])
        self.selection.load(ckpt["trainer"]["selection"])
        self.elapsed_before = ckpt["trainer"]["elapsed_s"]
        self.eval_seconds_before = ckpt["trainer"].get("eval_s", 0.0)  # absent before 2026-11
        self.stopped_early = ckpt["trainer"].get("stopped_early", False)
        self.best_weights = ckpt["best_weights"]
        if self.ema is not None and ckpt["ema_weights"] is not None:
            self.ema.shadow = {k: v.float() for k, v in ckpt["ema_weights"].items()}
        self.start_step = ckpt["step"]
        if self.is_main:
            truncate_metrics(self.run.metrics, self.start_step)
        self._print(f"resumed from {checkpoints[-1]} at step {self.start_step}")

    # ------------------------------------------------------------------------------------- train
    def compute_loss(self, batch: dict) -> torch.Tensor:
        """Mean loss of one micro-batch (label smoothing and R-Drop when switched on)."""
        cfg = self.cfg.train
        labels = batch["labels"]
        if self.contrastive:  # pooled [B, H]: a SetFit pair loss, the head is not involved
            _, pooled = self.model(**model_inputs(batch), return_embedding=True)
            return pair_cosine_loss(pooled, labels)
        if self.task == "causal_lm":  # logits [N, V] at the N positions before a response token
            logits, targets, _ = causal_lm_logits(self.model, batch)
            if not len(targets):  # every response truncated away: nothing to learn here
                return logits.sum() * 0.0
            return F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
        logits = output_logits(self.model(**model_inputs(batch)))  # [B, C], labels [B]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        if cfg.rdrop > 0:
            # R-Drop: a second pass with other dropout masks; penalise disagreement.
            logits2 = output_logits(self.model(**model_inputs(batch))).float()
            loss2 = F.cross_entropy(logits2, labels, label_smoothing=cfg.label_smoothing)
            lp1, lp2 = F.log_softmax(logits.float(), -1), F.log_softmax(logits2, -1)
            kl = 0.5 * (
                F.kl_div(lp1, lp2, log_target=True, reduction="batchmean")
                + F.kl_div(lp2, lp1, log_target=True, reduction="batchmean")
            )
            loss = 0.5 * (loss + loss2) + cfg.rdrop * kl
        return loss

    def backward_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """Gradients of one optimisation step, accumulated over its micro-batches; the step loss.

        Each micro-batch's mean loss is weighted by its share of the step: 1/grad_accum for
        classification (equal rows), and for causal LM its response tokens over those of the
        whole step on every rank, so the step is one mean over all its tokens, as one big batch
        would be (a plain 1/grad_accum over-weights short responses).
        """
        acc = self.accelerator
        if self.task == "causal_lm":
            tokens = torch.stack([_response_tokens(b) for b in micro_batches]).float()
            # DDP averages gradients over ranks: scale by the world size to get the global sum
            weights = tokens * acc.num_processes / acc.reduce(tokens.sum(), "sum").clamp(min=1)
        else:
            weights = torch.full((len(micro_batches),), 1 / len(micro_batches))
        step_loss = torch.zeros((), device=acc.device)
        for micro, (batch, weight) in enumerate(zip(micro_batches, weights.tolist())):
            # Only the last micro-batch of a step synchronises gradients across ranks; DeepSpeed
            # steps inside accelerator.backward at such a boundary, so only that one is marked.
            sync = micro == len(micro_batches) - 1
            if dist.is_deepspeed(acc):
                acc.gradient_state._set_sync_gradients(sync)
            with acc.no_sync(self.model) if not sync else contextlib.nullcontext():
                loss = self.compute_loss(batch) * weight
                acc.backward(loss)
            step_loss += loss.detach()
        return step_loss

    def _batches(self, tc: TrainConfig, start_step: int, sampling: str):
        """Iterator over the training micro-batches of steps start_step+1 .. tc.steps, drawn as
        `sampling` says (batch_sampling_for)."""
        acc = self.accelerator
        window = dict(
            start=start_step * tc.grad_accum,
            stop=tc.steps * tc.grad_accum,
            rank=acc.process_index,
            world=acc.num_processes,
        )
        if sampling == "class_pairs":
            labels = self.train_set["labels"]
            sampler = ClassPairBatchSampler(labels, tc.batch_size, tc.seed, **window)
        elif sampling == "by_length":
            lengths = [len(ids) for ids in self.train_set["input_ids"]]
            sampler = LengthGroupedBatchSampler(lengths, tc.batch_size, tc.seed, **window)
        else:
            sampler = StepBatchSampler(len(self.train_set), tc.batch_size, tc.seed, **window)
        # Not passed through accelerate.prepare: the sampler already shards by rank.
        loader = torch.utils.data.DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=self.collate,
            num_workers=tc.num_workers,
            generator=torch.Generator(),
        )
        return iter(loader)

    def _optimisation_step(self, batches, step: int, lr: float) -> tuple[torch.Tensor, int]:
        """One optimisation step on the next grad_accum micro-batches: (step loss, examples
        taken over all ranks)."""
        acc, tc = self.accelerator, self.train_cfg
        micro_batches = [
            {k: v.to(acc.device) for k, v in next(batches).items()} for _ in range(tc.grad_accum)
        ]
        step_loss = self.backward_step(micro_batches)
        # A NaN/inf on any rank stops every rank: the last good checkpoint stays on disk.
        if acc.reduce(torch.isfinite(step_loss).logical_not().float(), "sum").item() > 0:
            if self.monitored_selected is not None:
                # a resume would rerun the same seeded refit into the same NaN
                raise TrainingError(
                    f"the refit's training loss is {step_loss.item()} at step {step} (lr "
                    f"{lr:.3g}); lower train.lr, or set train.refit=false to test the "
                    "monitored run"
                )
            raise TrainingError(
                f"training loss is {step_loss.item()} at step {step} (lr {lr:.3g}); lower "
                f"train.lr or enable train.max_grad_norm; last good checkpoint: "
                f"{_newest(self.run)}"
            )
        if tc.max_grad_norm is not None:
            acc.clip_grad_norm_(self.model.parameters(), tc.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.update_ranks(step)  # AdaLoRA prunes ranks from the gradients; else a no-op
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.trainable)
        return step_loss, sum(len(b["labels"]) for b in micro_batches) * acc.num_processes

    def train(self) -> dict:
        tc = self.train_cfg  # train.steps raised to train.min_passes passes where it applies
        batches = self._batches(tc, self.start_step, self.batch_sampling)
        fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
        self.model.train()
        start_time = self.start_time = time.perf_counter()
        self.eval_seconds = 0.0
        examples_seen = 0
        step = self.start_step
        # a run resumed from its early-stop checkpoint goes straight to the end
        last_step = self.start_step if self.stopped_early else tc.steps
        progress = tqdm(
            total=tc.steps,
            initial=self.start_step,
            disable=not self.is_main,
            desc="train",
            unit="step",
        )
        with progress as bar:  # closed on errors too
            if self.start_step == 0:
                # Step 0: where the gap starts, and what training has to beat (the frozen body
                # with a fitted head under contrastive; the base model's loss for a causal LM).
                # In a forked RNG: the loaders' seed draws must not shift training's dropout.
                with torch.random.fork_rng(devices=_cuda_devices()):
                    self._evaluate_and_select(0, self.scheduler.get_last_lr()[0], 0.0, select=False)
            for step in range(self.start_step + 1, last_step + 1):
                lr = self.scheduler.get_last_lr()[0]
                step_loss, examples = self._optimisation_step(batches, step, lr)
                examples_seen += examples
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{lr:.2e}")

                if step % tc.eval_every == 0 or step == tc.steps:
                    stop = self._evaluate_and_select(step, lr, time.perf_counter() - start_time)
                    self.stopped_early = stop
                if step % tc.checkpoint_every == 0 or step == tc.steps or self.stopped_early:
                    self._save_checkpoint(step, time.perf_counter() - start_time)
                if fault_step and step == fault_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.stopped_early:
                    self._print(
                        f"early stop at step {step}: no {self.selection.metric} improvement in "
                        f"{self.selection.evals_since_best} evaluations"
                    )
                    break
        self.stopped_at = step
        if self.refit:
            examples_seen += self._refit()
        self.train_seconds = time.perf_counter() - start_time
        # None when this launch trained no step (resumed from the last step's checkpoint)
        self.examples_per_s = (
            examples_seen / max(self.train_seconds, 1e-9) if examples_seen else None
        )
        return self.finish()

    def _refit(self) -> int:
        """Train again from the start on train + validation, for the monitored run's selected
        number of steps; the examples it took (over all ranks).

        With a fixed budget, validation only watched the run (the curve, the gap, the
        temperature), so its labels can then be trained on, as in refitting on all labelled data
        once the settings are chosen. On K-shot data they double the labels: SST-2 / MR dev
        (training-split data) 74.2 / 72.3 vs 69.0 / 71.1 (docs/recipes.md). The temperature is
        the monitored run's, fitted on its validation; the refit model has no held-out split
        left, so its validation numbers are the monitored run's and only test sees the refit.
        Not checkpointed: an interrupted refit starts over from the last checkpoint on resume.
        """
        cfg, acc = self.cfg, self.accelerator
        self.monitored_selected = self._selected()
        steps = self.selection.best_step if self.monitored_selected == "best" else self.stopped_at
        self._use_selected_weights()
        self._fit_head()
        calibration = self._calibrate()  # on the monitored run's validation
        # the monitored run's score on the training sample: a refit that ends far below it on
        # the same rows has diverged (finish warns); nothing held out is needed to see that
        monitored_train = self._train_sample_metrics()

        # train + validation; validation's rows renumbered after train's, so that a row number
        # names one example (a given validation file numbers its rows from 0 too)
        offset = max(self.train_set["row"], default=-1) + 1
        rows = [row + offset for row in self.validation_set["row"]]
        validation = self.validation_set.remove_columns("row").add_column("row", rows)
        self.train_set = datasets.concatenate_datasets([self.train_set, validation])
        if not cfg.train.select_best and not self.stopped_early:
            # a fixed budget keeps its pass floor on the larger set; an early stop is kept as is
            floor = dataclasses.replace(self.train_cfg, steps=steps)
            steps = budget_steps(floor, acc.num_processes, len(self.train_set), self.task)
        self._prepare_head_fit()
        label_counts = _label_counts(self.train_set, self.num_classes)
        sampling = batch_sampling_for(cfg.train, self.contrastive, label_counts)

        # start over: the initial weights, a fresh optimiser state, schedule, EMA and loss
        # scale, the seed; the schedule has the monitored run's shape, over `steps`
        dist.write_full(acc, self.model, self.trainable, self.initial_weights)
        self.optimizer.state.clear()
        if self.initial_scaler is not None:
            acc.scaler.load_state_dict(self.initial_scaler)
        tc = dataclasses.replace(self.train_cfg, steps=steps)
        self.scheduler = _make_scheduler(self.optimizer, tc)
        self.ema = EMA(self.trainable, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.best_weights = None
        from accelerate.utils import set_seed

        set_seed(tc.seed)
        self._print(
            f"refit: training again from the start on train + validation ({self.num_train} + "
            f"{len(self.validation_set)} rows) for {steps} steps; validation numbers are the "
            "monitored run's, the test is this model's"
        )
        batches = self._batches(tc, 0, sampling)
        self.model.train()
        examples_seen = 0
        with tqdm(total=steps, disable=not self.is_main, desc="refit", unit="step") as bar:
            for step in range(1, steps + 1):
                lr = self.scheduler.get_last_lr()[0]
                step_loss, examples = self._optimisation_step(batches, step, lr)
                examples_seen += examples
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{lr:.2e}")
        self.refit_summary = {
            "steps": steps,
            "num_train": len(self.train_set),
            "batch_sampling": sampling,  # the summary's own field is the monitored run's
            "calibration": calibration,
            "monitored_train_sample": monitored_train,
        }
        return examples_seen

    def _refit_diverged(self, refit_train: dict) -> bool:
        """Whether the refit's training-sample accuracy (rows both models trained on) is more
        than REFIT_WARN_DROP below the monitored run's: a diverged refit that no validation
        number would show. Warns when it is. Classification only: a causal LM's training loss
        rises in a healthy refit too, which sees each row half as often."""
        before = self.refit_summary["monitored_train_sample"].get("accuracy")
        after = refit_train.get("accuracy")
        if before is None or after is None or before - after <= REFIT_WARN_DROP:
            return False
        logger.warning(
            f"refit: the refit model's training-sample accuracy is {after:.4f} against "
            f"{before:.4f} for the monitored run; it may have diverged (lower train.lr, or "
            "compare with train.refit=false); lorafit compare counts it as a failed run"
        )
        return True

    # ------------------------------------------------------------------------------- evaluation
    def _evaluate(self, loader, keep=False) -> EvalResult:
        with self._eval_weights():
            result = evaluate(
                self.model,
                loader,
                self.accelerator,
                self.task,
                self.cfg.eval,
                num_classes=self.num_classes,
                keep_per_example=keep,
            )
        self.eval_seconds += result.seconds
        return result

    @contextlib.contextmanager
    def _eval_weights(self):
        """Evaluate the EMA weights when EMA is on (swap in, then back)."""
        if self.ema is None:
            yield
            return
        saved = {k: p.detach().clone() for k, p in self.trainable.items()}
        _copy_into(self.trainable, self.ema.shadow)
        try:
            yield
        finally:
            _copy_into(self.trainable, saved)

    def _evaluate_and_select(self, step: int, lr: float, elapsed: float, select=True) -> bool:
        """Evaluate train sample + validation, log the gap, track the best (unless `select` is
        False: the untrained step 0 is logged, never kept); True = stop now."""
        tc = self.cfg.train
        self._fit_head()
        train_eval = self._train_sample_metrics()
        val = self._evaluate(self.validation_loader).metrics
        metric = self.selection.metric
        gap = _metric_gap(train_eval, val, metric)
        improved = select and self.selection.update(step, val[metric], val["loss"])
        if improved:
            self.best_weights = self._snapshot()
        row = {
            "step": step,
            "epoch": passes(tc, self.accelerator.num_processes, len(self.train_set), step),
            "lr": lr,
            "elapsed_s": self.elapsed_before + elapsed,
            "train": train_eval,
            "validation": val,
            "gap": gap,
            "best": improved,
        }
        if self.is_main:
            append_jsonl(self.run.metrics, row)
        self.accelerator.log(
            {
                **{f"train/{k}": v for k, v in train_eval.items()},
                **{f"validation/{k}": v for k, v in val.items()},
                **{f"gap/{k}": v for k, v in gap.items()},
                "lr": lr,
            },
            step=step,
        )
        patience = tc.early_stopping.patience
        return (
            select
            and patience is not None
            and step >= tc.early_stopping.min_steps
            and self.selection.evals_since_best >= patience
        )

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """CPU copy of the weights to keep (complete even under ZeRO-3/FSDP; all ranks call it)."""
        if self.ema is not None:
            return {k: v.detach().to("cpu", copy=True) for k, v in self.ema.shadow.items()}
        return dist.read_full(self.accelerator, self.model, self.trainable)

    def _save_checkpoint(self, step: int, elapsed: float) -> None:
        self.accelerator.wait_for_everyone()
        # Collectives first, on every rank: gathered weights (sharded backends) and each rank's
        # RNG state (each rank has its own dropout stream); then the main process writes.
        trainable = (
            dist.read_full(self.accelerator, self.model, self.trainable)
            if self.sharded
            else {k: p.detach() for k, p in self.trainable.items()}
        )
        rng_states = dist.gather_per_rank(rng_state())
        if self.is_main:
            save_checkpoint(
                self.run.checkpoints,
                step,
                trainable=trainable,
                optimizer=None if self.sharded else self.optimizer,
                scheduler=self.scheduler,
                trainer_state={
                    "selection": self.selection.state(),
                    "elapsed_s": self.elapsed_before + elapsed,
                    "eval_s": self.eval_seconds_before + self.eval_seconds,
                    "stopped_early": self.stopped_early,
                    "data_sha256": self.data_sha256,
                },
                best_weights=self.best_weights,
                ema_weights=self.ema.shadow if self.ema is not None else None,
                keep=self.cfg.train.keep_checkpoints,
                rng_states=rng_states,
            )
        self.accelerator.wait_for_everyone()

    # ----------------------------------------------------------------------------------- finish
    def _selected(self) -> str:
        """Which weights the monitored run keeps: "best" (a restored best step) or "last"."""
        if self.monitored_selected is not None:  # after a refit: what the monitored run kept
            return self.monitored_selected
        return "best" if self.cfg.train.select_best and self.best_weights is not None else "last"

    def _use_selected_weights(self) -> None:
        """Put the weights to test into the model: the best step's, else the EMA's or the last."""
        if self.cfg.train.select_best and self.best_weights is not None:
            dist.write_full(self.accelerator, self.model, self.trainable, self.best_weights)
        elif self.ema is not None:
            _copy_into(self.trainable, self.ema.shadow)
        self.ema = None  # the chosen weights are now in the model itself

    def finish(self) -> dict:
        """Restore the selected weights, test once, write adapter, predictions and summary."""
        cfg, acc = self.cfg, self.accelerator
        self._use_selected_weights()  # after a refit: its last (or EMA) weights
        self._fit_head()  # (contrastive) the head of the chosen body
        if self.refit_summary is None:
            calibration = self._calibrate()
        else:  # the monitored run's temperature: the refit has trained on validation
            calibration = self.refit_summary["calibration"]
            if calibration:
                self._fold_temperature(calibration["temperature"])
        metric = self.selection.metric
        final_train = self._train_sample_metrics()
        if self.refit_summary is not None:
            self.refit_summary["diverged"] = self._refit_diverged(final_train)
        test = self._evaluate(self.test_loader, keep=True)
        ci = confidence_intervals(test.per_example, self.task, self.num_classes, cfg.eval)
        if calibration:  # what calibration changed on test: the same logits before the scaling
            calibration["test_before"] = _calibration_metrics(
                test.per_example["logits"] * calibration["temperature"],
                test.per_example["label"],
                self.num_classes,
                cfg.eval.ece_bins,
            )

        rows = read_jsonl(self.run.metrics) if self.is_main else []
        start_row = next((r for r in rows if r["step"] == 0), None)  # None when resumed past it
        best_row = next((r for r in rows if r["step"] == self.selection.best_step), None)
        last_row = rows[-1] if rows else None
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        selected = self._selected()
        selected_row = best_row if selected == "best" else last_row
        summary = {
            "status": "completed",
            "task": self.task,
            "method": cfg.method.name,
            "objective": self.objective,
            "batch_sampling": self.batch_sampling,
            "calibration": calibration,
            "model": cfg.model.name_or_path,
            "pooling": self.model_info.get("pooling"),
            "pool_layers": self.model_info.get("pool_layers"),
            "k_shot": cfg.data.k_shot,
            "seed": cfg.train.seed,
            "data_seed": cfg.data.seed,
            "selection_metric": metric,
            "selected": selected,
            "ema_decay": cfg.train.ema_decay,  # "last" weights are the EMA's when set
            "best_step": self.selection.best_step,
            "steps": self.train_cfg.steps,  # the budget run: train.steps or the min_passes floor
            "stopped_at_step": self.stopped_at,
            "stopped_early": self.stopped_early,
            "test": {**test.metrics, "ci": ci, "ci_level": cfg.eval.ci_level},
            "test_per_class": {k: v.tolist() for k, v in test.arrays.items()},
            "train_sample_at_selected": final_train,
            "validation_at_start": start_row["validation"] if start_row else None,
            "best_validation": best_row["validation"] if best_row else None,
            # validation of the weights that were tested (the last step's under a fixed budget)
            "validation_at_selected": selected_row["validation"] if selected_row else None,
            "gap_at_best": best_row["gap"] if best_row else None,
            "gap_at_end": last_row["gap"] if last_row else None,
            "train_test_gap": _gap(final_train, test.metrics, metric),
            "label_names": self.label_names,
            "num_train": self.num_train,  # of the monitored run; a refit adds validation's
            "num_validation": len(self.validation_set),
            # the tested model was trained again on train + validation (train.refit)
            "refit": (
                {k: v for k, v in self.refit_summary.items() if k != "calibration"}
                if self.refit_summary
                else None
            ),
            # the majority-class rate of validation: a run at or below it has failed (Mosbach et al.)
            "validation_label_counts": _label_counts(self.validation_set, self.num_classes),
            "num_test": len(self.test_set),
            "data_source": self.data.source,
            "data_warnings": self.data.warnings,
            "trainable_params": self.model_info["trainable_params"],
            "total_params": self.model_info["total_params"],
            "peak_memory_mb": peak_rss_mb,
            "peak_cuda_memory_mb": torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available()
            else None,
            # training, evaluations, the final test: what eval_time_s is a share of
            "wall_time_s": self.elapsed_before + time.perf_counter() - self.start_time,
            "eval_time_s": self.eval_seconds_before + self.eval_seconds,
            "examples_per_s": self.examples_per_s,
            "num_processes": acc.num_processes,
            "config_sha256": cfg.fingerprint(),
            "data_sha256": self.data_sha256,
            **environment_info(),
        }
        acc.wait_for_everyone()
        # ZeRO-3 / FSDP: the module holds shards; gather the trained weights and the head (a
        # fitted head is not trainable; every rank takes part) so what rank 0 saves is complete.
        gathered = (
            dist.read_full(acc, self.model, {**self.trainable, **self._head_params()})
            if self.sharded and cfg.output.save_adapter
            else None
        )
        if self.is_main:
            if cfg.eval.save_predictions:
                _write_predictions(self.run.predictions, test.per_example, self.label_names)
            if cfg.output.save_adapter:
                Meth.save_trained(
                    self.unwrapped, self.run.adapter, tokenizer=self.tokenizer, state_dict=gathered
                )
            if cfg.output.plot:
                tested_step = selected_row["step"] if selected_row else None
                plot_learning_curve(
                    self.run.metrics,
                    self.run.learning_curve,
                    metric,
                    self.selection.best_step,
                    tested_step,
                    refit_rows=self.refit_summary["num_train"] if self.refit_summary else None,
                    refit_steps=self.refit_summary["steps"] if self.refit_summary else None,
                )
            summary["adapter_bytes"] = _weight_bytes(self.run.adapter)
            write_json(self.run.summary, summary)
        acc.wait_for_everyone()
        if cfg.output.report_to:
            # Not acc.end_training(): it also destroys the process group, and a process that
            # trains again (several runs under one launch) would find no group left.
            for tracker in acc.trackers:
                tracker.finish()
        return summary

    def _print(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg)


# --------------------------------------------------------------------------------------- helpers


def examples_per_step(train_cfg, world: int) -> int:
    """Training examples one optimisation step takes over all `world` processes."""
    return train_cfg.batch_size * train_cfg.grad_accum * world


def passes(train_cfg, world: int, num_train: int, steps: int) -> float:
    """Epochs that `steps` optimisation steps make over `num_train` rows on `world` processes."""
    return steps * examples_per_step(train_cfg, world) / max(num_train, 1)


def budget_steps(train_cfg, world: int, num_train: int, task: str) -> int:
    """train.steps, raised to cover train.min_passes passes over a classification training set."""
    if task != "classification" or not train_cfg.min_passes:
        return train_cfg.steps
    per_step = examples_per_step(train_cfg, world)
    return max(train_cfg.steps, math.ceil(train_cfg.min_passes * num_train / per_step))


def budget_note(train_cfg, steps: int, world: int, num_train: int, task: str) -> str | None:
    """A line when the budget was raised to train.min_passes, or when it covers fewer passes
    over a classification training set than the defaults were chosen at (a set train.steps, or
    a method without the floor)."""
    if steps > train_cfg.steps:
        return (
            f"budget: {steps} steps, train.steps={train_cfg.steps} raised to cover "
            f"train.min_passes={train_cfg.min_passes:g} passes over the {num_train} training "
            f"rows (docs/recipes.md)"
        )
    covered = passes(train_cfg, world, num_train, steps)
    if task != "classification" or covered >= recipes.MIN_PASSES:
        return None
    return (
        f"budget: train.steps={steps} is {covered:.1f} passes over the {num_train} training "
        f"rows; the few-shot defaults were chosen at 6-50 passes (docs/recipes.md): raise "
        f"train.steps or train.min_passes"
    )


def batch_note(train_cfg, world: int, num_train: int) -> str | None:
    """A line when the rows of one micro-step (all processes) outnumber the training set."""
    rows = train_cfg.batch_size * world
    if rows <= num_train:
        return None
    return (
        f"batch: {rows} rows per micro-step (train.batch_size={train_cfg.batch_size} x {world} "
        f"process(es)) but {num_train} training rows, so rows repeat within a step; set "
        f"train.batch_size={max(1, num_train // world)} or lower"
    )


# Same-label pairs per micro-batch under which the contrastive objective is outside the evidence:
# chosen at 13.5 (K=16 x 2 classes) and 6.7 (x 4), carried over at 4.4 (x 6) with batch 8.
# Below it class-pair batches were ahead at 1.5 (14 classes) and level at 2.8 (2, batch 4).
FEW_SHOT_MIN_SAME_LABEL_PAIRS = 4.0


def same_label_pairs(label_counts: list[int], batch_size: int) -> float:
    """Expected same-label pairs in a batch drawn without replacement from these class counts."""
    n = sum(label_counts)
    if n < 2:
        return 0.0
    share = sum(c * (c - 1) for c in label_counts) / (n * (n - 1))  # P(a random pair agrees)
    return batch_size * (batch_size - 1) / 2 * share


def _pairs_per_batch(batch_size: int) -> int:
    return -(-batch_size // 2)


def _same_class_pairs(class_sizes: list[int]) -> int:
    """Disjoint same-class pairs the classes make: what `ClassPairBatchSampler` deals per epoch."""
    return sum(size // 2 for size in class_sizes)


def _makes_a_batch_of_pairs(label_counts: list[int], batch_size: int) -> bool:
    """Whether `ClassPairBatchSampler` can fill one batch (auto never picks it otherwise)."""
    return _same_class_pairs(label_counts) >= _pairs_per_batch(batch_size)


def batch_sampling_for(
    train_cfg: TrainConfig, contrastive: bool, label_counts: list[int] | None
) -> str:
    """The batch draw `train.batch_sampling` means here: auto is class_pairs when the contrastive
    objective would see few same-label pairs in a random batch and the classes make a batch of
    pairs, else random."""
    choice = train_cfg.batch_sampling  # class_pairs on a causal LM: refused by objective_for
    if choice != "auto":
        return choice
    if not contrastive or label_counts is None:
        return "random"
    few = same_label_pairs(label_counts, train_cfg.batch_size) < FEW_SHOT_MIN_SAME_LABEL_PAIRS
    fits = _makes_a_batch_of_pairs(label_counts, train_cfg.batch_size)
    return "class_pairs" if few and fits else "random"


def pairs_note(
    train_cfg: TrainConfig, contrastive: bool, batch_sampling: str, label_counts: list[int] | None
) -> str | None:
    """A line when a random batch would hold few same-label pairs for the pair loss."""
    if not contrastive or label_counts is None:
        return None
    size = train_cfg.batch_size
    pairs = same_label_pairs(label_counts, size)
    if pairs >= FEW_SHOT_MIN_SAME_LABEL_PAIRS:
        return None
    random_batch = (
        f"a random batch of {size} holds {pairs:.1f} same-label pairs on average over "
        f"{len(label_counts)} classes"
    )
    if batch_sampling == "class_pairs":
        return (
            f"pairs: {random_batch}, so each batch is {_pairs_per_batch(size)} same-class pairs "
            f"of different classes instead (train.batch_sampling={train_cfg.batch_sampling}; "
            "docs/recipes.md)"
        )
    if not _makes_a_batch_of_pairs(label_counts, size):
        return (
            f"pairs: {random_batch}, and too few classes have two examples to fill a batch with "
            "same-class pairs: more labels per class (data.k_shot) give the pair loss more to learn from"
        )
    return f"pairs: {random_batch}: set train.batch_sampling=class_pairs (docs/recipes.md)"


def train(cfg: RunConfig) -> dict:
    """Run one training job and return its summary (also written to summary.json)."""
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer.train()


def _make_optimizer(groups: list[dict], cfg: RunConfig) -> torch.optim.Optimizer:
    tc = cfg.train
    kwargs = dict(lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps)
    if tc.optimizer == "adamw_8bit":
        from lorafit._optional import bitsandbytes

        return bitsandbytes().optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)  # bias-corrected (Mosbach et al. 2021)


def _make_scheduler(optimizer, tc: TrainConfig):
    warmup = tc.warmup_steps  # validated against train.steps by RunConfig

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if tc.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, tc.steps - warmup)
        if tc.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            if hasattr(module, "enable_input_require_grads"):
                module.enable_input_require_grads()
            return
    raise ConfigError("train.gradient_checkpointing=true but this model does not support it")


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@torch.no_grad()
def _copy_into(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for k, p in params.items():
        p.copy_(values[k].to(p.device, p.dtype))


def _response_tokens(batch: dict) -> torch.Tensor:
    """Tokens a causal-LM batch is scored on: the positions causal_lm_logits keeps."""
    return scored_positions(batch["labels"]).sum()


def _metric_gap(train_metrics: dict, other_metrics: dict, metric: str) -> dict:
    """How much better the training sample scores than `other` (validation or test) on the loss
    and `metric`: positive when memorising, for metrics where higher is better (train - other)
    and where lower is (other - train) alike."""
    gap = {"loss": other_metrics["loss"] - train_metrics["loss"]}
    if metric != "loss" and metric in other_metrics:
        difference = train_metrics[metric] - other_metrics[metric]
        gap[metric] = -difference if metric in LOWER_IS_BETTER else difference
    return gap


def _gap(train_metrics: dict, test_metrics: dict, metric: str) -> dict:
    """`_metric_gap` against test, plus the accuracy gap whenever there is one."""
    gap = _metric_gap(train_metrics, test_metrics, metric)
    if "accuracy" in test_metrics:
        gap["accuracy"] = train_metrics["accuracy"] - test_metrics["accuracy"]
    return gap


# What a temperature changes (accuracy and every other argmax metric it does not).
CALIBRATION_METRICS = ("nll", "brier", "ece")


def _calibration_metrics(logits, labels, num_classes: int, ece_bins: int) -> dict[str, float]:
    """NLL, Brier and ECE of logits [N, C]."""
    acc = M.ClassificationMetrics(num_classes=num_classes, ece_bins=ece_bins)
    if len(labels):
        acc.update(np.ascontiguousarray(logits, dtype=np.float32), labels)
    out = acc.compute()
    return {k: float(out[k]) for k in CALIBRATION_METRICS}


def _write_predictions(path, per_example: dict | None, label_names) -> None:
    import json

    if per_example is None:
        return
    order = np.argsort(per_example["row"], kind="stable")
    lines = []
    for i in order:
        row = {"row": int(per_example["row"][i]), "nll": float(per_example["nll"][i])}
        if "label" in per_example:
            row.update(
                label=int(per_example["label"][i]),
                pred=int(per_example["pred"][i]),
                prob=[round(float(p), 6) for p in per_example["prob"][i]],
            )
            if label_names:
                row.update(label_name=label_names[row["label"]], pred_name=label_names[row["pred"]])
        else:
            row.update(
                nll_sum=float(per_example["nll_sum"][i]), n_tokens=int(per_example["n_tokens"][i])
            )
        lines.append(json.dumps(row))
    write_text(path, "\n".join(lines) + "\n")


def _label_counts(dataset, num_classes: int | None) -> list[int] | None:
    if num_classes is None:
        return None
    return np.bincount(np.asarray(dataset["labels"]), minlength=num_classes).tolist()


def _weight_bytes(path) -> int | None:
    """Bytes of the saved weights (*.safetensors): what the method adds; the tokenizer and
    configs saved beside them (~0.7 MB for MiniLM's tokenizer) are not counted."""
    if not path.exists():
        return None
    return sum(f.stat().st_size for f in path.rglob("*.safetensors") if f.is_file())


def _newest(run: RunDir) -> str:
    found = list_checkpoints(run.checkpoints)
    return str(found[-1]) if found else "none yet"


def _tracker_config(cfg: RunConfig) -> dict:
    """The settings as trackers take them: flat keys, scalar values (anything else as text)."""
    scalar = (int, float, str, bool)
    return {
        k: v if isinstance(v, scalar) else str(v) for k, v in flat_settings(cfg.to_dict()).items()
    }
