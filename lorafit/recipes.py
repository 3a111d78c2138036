"""Per-method defaults for few labels: the values a run gets for every setting left unset.

`RunConfig` leaves `train.lr`, `train.steps`, `train.head_lr`, `train.select_best`,
`method.r` and `method.alpha` as None ("the method's default") until it is built, then fills
them in from `RECIPES[method.name]` (`GENERIC` for other PEFT methods). Anything set in the YAML
or on the command line wins. The resolved values are what `config.yaml` of every run records.

The table is the same for every dataset (no per-dataset tuning). How each value was chosen, on
training-split data only, is in docs/recipes.md; `scripts/select_defaults.py` reruns the
selection and `scripts/recipes_table.py` the test-set table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Passes over a classification training set that the default budget of LoRA, QLoRA and full FT
# always covers: the recipes were chosen at 6-50 passes of 200 steps (K=64 x 4 classes to K=16 x
# 2), and at 1,024 rows (1.6 passes) 5 passes were ahead of 200 steps on the SST-2 and MR dev sets
# (docs/recipes.md, "The step budget on a large training set"). A set train.steps is kept.
MIN_PASSES = 5.0


@dataclass(frozen=True)
class Recipe:
    """Defaults of one method (None: not applicable to that method)."""

    lr: float  # peak learning rate of the body (head too unless head_lr is set)
    steps: int  # fixed optimisation budget, not epochs
    head_lr: float | None  # learning rate of the freshly initialised head; None: lr
    select_best: bool  # restore the best validation step (True) or keep the last (False)
    min_passes: float = 0.0  # classification: the budget covers at least this many passes
    objective: str = "ce"  # train.objective; auto: contrastive for classification, else ce
    r: int | None = None  # LoRA rank (PEFT methods with a rank); alpha defaults to 2 * r
    pool_layers: int = 1  # model.pool_layers: pool the mean of the last N layers (token poolings)
    refit: bool = False  # K-shot classification: train again on train + validation (train.refit)
    why: str = ""  # one line of evidence (dev accuracy %), printed by `lorafit config`


# Shared by the LoRA family: rank 8, alpha 2r, all linear layers of the blocks
# (method.target_modules=auto resolves to them for known architectures), 10% warmup (the
# train.warmup default), linear decay, a fixed budget, the last step kept, and the SetFit-style
# contrastive objective (the head fitted by logistic regression; lorafit/objectives.py); on
# K-shot data the run is then refit on train + validation (train.refit; docs/training.md).
_LORA = dict(
    lr=3e-4,
    steps=200,
    min_passes=MIN_PASSES,
    head_lr=None,
    select_best=False,
    r=8,
    objective="auto",
    refit=True,
)

RECIPES: dict[str, Recipe] = {
    "lora": Recipe(
        **_LORA,
        why="Contrastive, dev (train split) SST-2 / MR: every linear layer 69.0 / 71.1, attention "
        "only 66.5 / 69.6; SST-2 lr 1e-4 67.7, 1e-3 67.2; 100 / 400 steps 67.7 / 67.6; at "
        "1,024 rows 5 passes 84.3 / 79.5 vs 200 steps (1.6 passes) 81.1 / 74.4; refit on train + "
        "validation 74.2 / 72.3.",
    ),
    "qlora": Recipe(
        **_LORA,
        why="The LoRA recipe on the NF4 base, not tuned separately; K=16 test 0.5-1.6 points "
        "under LoRA on SST-2 / MR / AG News.",
    ),
    "full": Recipe(
        lr=5e-5,
        steps=200,
        min_passes=MIN_PASSES,
        head_lr=1e-2,
        select_best=False,
        objective="auto",
        refit=True,
        why="Contrastive, dev (train split) SST-2 / MR / AG News 67.0 / 73.3 / 86.8 at lr 5e-5 "
        "vs 66.9 / 71.3 / 85.2 at 2e-5 and 68.2 / 71.9 / 85.2 at 1e-4; at 1,024 rows 5 passes "
        "84.0 / 82.9 vs 200 steps 84.0 / 78.0; refit on train + validation 75.5 / 72.4.",
    ),
    "head": Recipe(
        lr=1e-2,
        steps=200,
        head_lr=None,
        select_best=False,
        pool_layers=3,
        refit=True,
        why="Linear probe on the checkpoint pooling of the last 3 layers' mean; dev (train split) "
        "SST-2 / MR / AG News 65.5 / 68.9 / 81.8 vs 63.9 / 65.1 / 78.8 on the last layer alone; "
        "no pass floor: at 1,024 rows 5 passes were level with 200 steps (81.3 / 76.0 vs "
        "79.7 / 77.0); refit on train + validation 72.2 / 71.3 / 84.7.",
    ),
}

# Any other PEFT method (ia3, loha, prompt_tuning, ...): the pre-recipe defaults, untested here.
GENERIC = Recipe(
    lr=5e-4,
    steps=200,
    head_lr=None,
    select_best=True,
    r=8,
    why="Other PEFT methods: not selected on evidence; the historical defaults.",
)

# (section, field) pairs that resolve from the recipe when left as None.
TRAIN_FIELDS = ("lr", "steps", "min_passes", "head_lr", "select_best", "objective")
METHOD_FIELDS = ("r", "alpha")


def recipe_for(method_name: str) -> Recipe:
    """The defaults of `method_name` (case-insensitive); GENERIC for any other PEFT method."""
    return RECIPES.get(str(method_name).lower(), GENERIC)


def resolve_method(method_cfg: Any) -> None:
    """Fill `method.r` (the recipe's rank) and `method.alpha` (2 * r) left as None, in place."""
    recipe = recipe_for(method_cfg.name)
    if method_cfg.r is None:
        method_cfg.r = recipe.r if recipe.r is not None else GENERIC.r
    if method_cfg.alpha is None and isinstance(method_cfg.r, (int, float)):
        method_cfg.alpha = float(2 * method_cfg.r)


def resolve_pool_layers(
    requested: int | None, method_name: str, pooling: str, num_layers: int | None
) -> int:
    """`model.pool_layers` at build time, once the pooling is known: the pooler reads one
    layer, and the recipe's value is capped at the model's depth (a set value is not)."""
    if requested is not None:
        return requested
    if pooling == "pooler":
        return 1
    return min(recipe_for(method_name).pool_layers, num_layers or 1)


def resolve_train(train_cfg: Any, method_name: str) -> None:
    """Fill the train fields left as None from the method's recipe (in place).

    `head_lr` resolves to a number always (the recipe's head_lr, else the resolved lr), so the
    saved config.yaml reads the same whichever way it is loaded again.
    """
    recipe = recipe_for(method_name)
    if train_cfg.min_passes is None:  # the floor goes with the default budget only
        train_cfg.min_passes = recipe.min_passes if train_cfg.steps is None else 0.0
    if train_cfg.lr is None:
        train_cfg.lr = recipe.lr
    if train_cfg.steps is None:
        train_cfg.steps = recipe.steps
    if train_cfg.select_best is None:
        train_cfg.select_best = recipe.select_best
    if train_cfg.objective is None:
        train_cfg.objective = recipe.objective
    if train_cfg.head_lr is None:
        train_cfg.head_lr = recipe.head_lr if recipe.head_lr is not None else train_cfg.lr


def resolve(cfg: Any) -> Any:
    """Fill every per-method default of a RunConfig left unset (in place); returns cfg."""
    resolve_method(cfg.method)
    resolve_train(cfg.train, cfg.method.name)
    return cfg


def table() -> list[dict[str, Any]]:
    """The defaults as rows (method + fields), for docs and `scripts/recipes_table.py`."""
    rows = [{"method": name, **dataclasses.asdict(r)} for name, r in RECIPES.items()]
    rows.append({"method": "(other PEFT)", **dataclasses.asdict(GENERIC)})
    return rows
