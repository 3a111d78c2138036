"""Per-method defaults (lorafit/recipes.py): what an unset setting resolves to, and what wins."""

import pytest

from lorafit import recipes
from lorafit.config import MethodConfig, RunConfig, TrainConfig, load_config, refit_for
from lorafit.errors import ConfigError


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "head"])
def test_unset_settings_take_the_method_recipe(method):
    cfg = load_config(None, [f"method.name={method}"])
    recipe = recipes.RECIPES[method]
    assert cfg.train.lr == recipe.lr
    assert cfg.train.steps == recipe.steps
    assert cfg.train.select_best is recipe.select_best
    assert cfg.train.head_lr == (recipe.head_lr if recipe.head_lr is not None else recipe.lr)
    if recipe.r is not None:
        assert (cfg.method.r, cfg.method.alpha) == (recipe.r, 2.0 * recipe.r)


def test_methods_get_different_defaults():
    lrs = {m: load_config(None, [f"method.name={m}"]).train.lr for m in ("lora", "full", "head")}
    assert lrs["full"] < lrs["lora"] < lrs["head"]


def test_explicit_values_win_over_the_recipe(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: {name: full}\ntrain: {lr: 1.0e-4}\n")
    cfg = load_config(
        path,
        ["train.steps=7", "train.select_best=true", "method.r=4", "train.head_lr=2e-3"],
    )
    assert (cfg.train.lr, cfg.train.steps, cfg.train.select_best) == (1e-4, 7, True)
    assert (cfg.train.head_lr, cfg.method.r) == (2e-3, 4)
    assert cfg.method.alpha == 8.0  # alpha follows the rank: 2 * r


def test_head_lr_defaults_to_lr_when_the_recipe_has_none():
    cfg = load_config(None, ["method.name=head", "train.lr=3e-3"])
    assert cfg.train.head_lr == pytest.approx(3e-3)
    cfg = load_config(None, ["method.name=full", "train.lr=1e-4"])
    assert cfg.train.head_lr == recipes.RECIPES["full"].head_lr  # the head keeps its own rate


def test_method_name_is_case_insensitive_and_other_peft_methods_get_generic():
    assert load_config(None, ["method.name=LoRA"]).train.lr == recipes.RECIPES["lora"].lr
    cfg = load_config(None, ["method.name=ia3"])
    assert (cfg.train.lr, cfg.train.steps) == (recipes.GENERIC.lr, recipes.GENERIC.steps)
    assert recipes.recipe_for("loha") is recipes.GENERIC


@pytest.mark.parametrize(
    ("overrides", "task", "expected"),
    [
        (["data.k_shot=16"], "classification", True),  # validation drawn from the labelled pool
        (["data.k_shot=16", "method.name=head"], "classification", True),
        ([], "classification", False),  # a validation split the user gave: never trained on
        (["data.k_shot=16"], "causal_lm", False),
        (["data.k_shot=16", "method.name=ia3"], "classification", False),  # no evidence
        (["data.k_shot=16", "train.refit=false"], "classification", False),
        (["train.refit=true"], "classification", True),  # set: any run
        (["train.refit=true", "method.name=ia3"], "causal_lm", True),
    ],
)
def test_refit_defaults_to_k_shot_classification_under_the_recipes(overrides, task, expected):
    assert refit_for(load_config(None, overrides), task) is expected


def test_refit_refuses_adalora_whose_rank_schedule_belongs_to_the_monitored_run():
    with pytest.raises(ConfigError, match="train.refit does not apply to method.name=adalora"):
        load_config(None, ["method.name=adalora", "train.refit=true"])  # before anything loads
    assert not refit_for(
        load_config(None, ["method.name=adalora", "data.k_shot=8"]), "classification"
    )


def test_the_pass_floor_goes_with_the_default_budget_only():
    assert load_config(None, []).train.min_passes == recipes.MIN_PASSES
    assert load_config(None, ["method.name=full"]).train.min_passes == recipes.MIN_PASSES
    assert load_config(None, ["method.name=head"]).train.min_passes == 0  # level on dev
    assert load_config(None, ["train.steps=300"]).train.min_passes == 0  # a set budget is kept
    cfg = load_config(None, ["train.steps=300", "train.min_passes=2"])
    assert (cfg.train.steps, cfg.train.min_passes) == (300, 2)
    with pytest.raises(ConfigError, match="train.min_passes"):
        load_config(None, ["train.min_passes=-1"])


def test_resolved_config_round_trips_and_is_concrete(tmp_path):
    for method in ("lora", "full", "head", "qlora", "ia3"):
        cfg = load_config(None, [f"method.name={method}"])
        for name in recipes.TRAIN_FIELDS:
            assert getattr(cfg.train, name) is not None, name
        for name in recipes.METHOD_FIELDS:
            assert getattr(cfg.method, name) is not None, name
        path = tmp_path / f"{method}.yaml"
        path.write_text(cfg.to_yaml())
        again = load_config(path)
        assert again == cfg and again.fingerprint() == cfg.fingerprint()


def test_saved_config_does_not_change_when_the_method_changes_later(tmp_path):
    # a resolved lora config loaded with method.name=full keeps the (now explicit) lora values
    path = tmp_path / "c.yaml"
    path.write_text(load_config(None, ["method.name=lora"]).to_yaml())
    cfg = load_config(path, ["method.name=full"])
    assert cfg.train.lr == recipes.RECIPES["lora"].lr


def test_standalone_sections():
    method = MethodConfig(name="lora")
    assert (method.r, method.alpha) == (recipes.RECIPES["lora"].r, 2.0 * recipes.RECIPES["lora"].r)
    assert MethodConfig(name="loha", r=4).alpha == 8.0
    assert MethodConfig(name="lora", r=4, alpha=4).alpha == 4.0
    train = TrainConfig()  # unresolved until it is part of a RunConfig
    assert train.lr is None and train.steps is None
    run = RunConfig(method=MethodConfig(name="full"), train=TrainConfig())
    assert run.train.lr == recipes.RECIPES["full"].lr


def test_validation_still_applies_to_explicit_and_resolved_values():
    with pytest.raises(ConfigError, match="train.lr=-1.0 must be > 0"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="method.r=0 must be > 0"):
        load_config(None, ["method.r=0"])
    with pytest.raises(ConfigError, match="longer than train.steps"):
        load_config(None, ["train.steps=5", "train.warmup=10"])


def test_table_lists_every_method_with_evidence():
    rows = recipes.table()
    assert {r["method"] for r in rows} >= {"lora", "qlora", "full", "head"}
    assert all(r["why"] for r in rows)
