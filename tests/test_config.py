import pytest
import yaml

from lorafit.config import RunConfig, config_docs, load_config
from lorafit.errors import ConfigError
from lorafit.sweep import load_sweep


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = RunConfig()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 5e-4, steps: 10}\nmethod: {name: LoRA}\n")
    cfg = load_config(
        path, ["train.steps=20", "method.target_modules=[query,value]", "data.k_shot=8"]
    )
    assert cfg.train.lr == pytest.approx(5e-4)
    assert cfg.train.steps == 20
    assert cfg.method.name == "lora"
    assert cfg.method.target_modules == ["query", "value"]
    assert cfg.data.k_shot == 8
    assert cfg.train.checkpoint_every == cfg.train.eval_every


@pytest.mark.parametrize(
    "given, expected",
    [
        ("query,value", ["query", "value"]),  # typed without brackets
        ("query", ["query"]),
        ("5", ["5"]),  # a name, checked against the model's layers when it loads
        ("attention", "attention"),
        ("all-linear", "all-linear"),
    ],
)
def test_target_modules_without_brackets_is_a_list_of_names(given, expected):
    assert load_config(None, [f"method.target_modules={given}"]).method.target_modules == expected


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.lrr=1"], "did you mean 'train.lr'"),
        (["trian.lr=1"], "did you mean 'train'"),
        (["train.early_stoping.patience=2"], "did you mean 'train.early_stopping'"),
        (["train.pooling=mean"], "did you mean 'model.pooling'"),
        (["method.name=lorra"], "method.name='lorra' is not a known method; did you mean 'lora'?"),
        (["train.output_dir=x"], "did you mean 'output.dir'"),
        (["data.text_column=review"], "did you mean 'data.text'"),
        (["method.lora_r=4"], "did you mean 'method.r'"),
        (["train.per_device_train_batch_size=4"], "did you mean 'train.batch_size'"),
        (["train.gradient_accumulation_steps=2"], "did you mean 'train.grad_accum'"),
        (["train.learning_rate=1e-4"], "did you mean 'train.lr'"),
        (["train.bf16=true"], "did you mean 'train.mixed_precision'"),
        (["data.response=answer"], "did you mean 'data.output'"),
        (["train.steps=-3"], "train.steps=-3 must be > 0"),
        (["train.steps=abc"], "train.steps must be an integer"),
        (["method.dropout=1.5"], "method.dropout"),
        (["train.schedule=step"], "train.schedule='step' is not valid"),
        (["data.k_shot=4", "data.train_size=0.5"], "exclusive"),
        (["train.resume=maybe"], "train.resume must be true or false"),
        (["train.lr=nan"], "train.lr must be a finite number, got nan"),
        (["train.seed=-1"], "train.seed=-1 must be >= 0"),
        (["data.seed=-1"], "data.seed=-1 must be >= 0"),
        (["train.lr=inf"], "train.lr must be a finite number, got inf"),
        (["data.labels=[no, yes]"], "data.labels must be a string, got False; quote the value"),
        (
            ["method.target_modules=[query,value"],
            "'[query,value' is not a valid YAML list or mapping; close its brackets",
        ),
        (["oops"], "must look like section.key=value"),
        (["model.pool_layers=0"], "model.pool_layers=0 must be > 0"),
        (
            ["model.pooling=pooler", "model.pool_layers=2"],
            "model.pool_layers=2 needs a token pooling",
        ),
        (["data.labels=[pos,pos,neg]"], "data.labels lists 'pos' twice"),
        (["output.report_to=[foo]"], "output.report_to: unknown tracker 'foo'; use any of"),
        (["train.early_stopping.metric=f1"], "train.early_stopping.metric='f1' is not valid"),
        (
            ["method.peft_kwargs={r:4}"],
            "method.peft_kwargs key 'r:4' has no value: YAML needs a space after the colon, {r: 4}",
        ),
        (
            ["method.name=head", "method.peft_kwargs={r: 4}"],
            "method.peft_kwargs applies to PEFT methods, not method.name=head",
        ),
        (
            ["method.name=full", "method.target_modules=[query]"],
            "method.target_modules applies to adapter methods, not method.name=full",
        ),
        (["method.name=poly"], "method.name=poly is not supported: it routes each example"),
        (
            ["model.task=causal_lm", "train.early_stopping.metric=accuracy"],
            "train.early_stopping.metric='accuracy' is not a causal_lm metric; use one of "
            "['auto', 'loss', 'perplexity', 'top1_accuracy', 'top5_accuracy']",
        ),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_key_given_twice_is_refused_and_an_empty_section_is_empty(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train: {steps: 5}\ndata: {k_shot: 4}\ntrain:\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml line 3: .*key 'train' appears twice"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  lr: 1e-3\n  steps: 5\n  lr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"line 4: .*key 'lr' appears twice"):
        load_config(nested)
    empty = tmp_path / "empty.yaml"
    empty.write_text("train:\n  # steps: 3\n")
    assert load_config(empty).train == load_config(None).train


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml line"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_folder_given_as_config_points_at_its_saved_config(tmp_path):
    # `lorafit train runs/x` or `lorafit compare runs/sweep`: a folder, not a missing file
    run, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    run.mkdir(), sweep_dir.mkdir()
    (run / "config.yaml").write_text(RunConfig().to_yaml())
    (sweep_dir / "sweep.yaml").write_text("sweep: {}\n")
    with pytest.raises(
        ConfigError,
        match=f"{run} is a folder, not a YAML file; its resolved config is {run / 'config.yaml'}$",
    ):
        load_config(run)
    with pytest.raises(
        ConfigError,
        match=f"{sweep_dir} is a folder, not a YAML file; pass a YAML file such as configs/sst2_lora.yaml",
    ):
        load_config(sweep_dir)
    with pytest.raises(ConfigError, match=f"its resolved config is {sweep_dir / 'sweep.yaml'}$"):
        load_sweep(sweep_dir)
    with pytest.raises(ConfigError, match="such as configs/compare_sst2_ci.yaml"):
        load_sweep(run)


def test_every_field_has_a_doc():
    rows = config_docs()
    assert len(rows) > 60
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]


def test_example_configs_parse():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    files = sorted((root / "configs").glob("*.yaml")) + [root / "lorafit/recipes/demo.yaml"]
    assert len(files) >= 4
    for f in files:
        text = f.read_text()
        data = yaml.safe_load(text)
        if "runs" in data or "sweep" in data:  # sweep configs are checked in test_sweep
            continue
        assert text.startswith("# lorafit ") or text.startswith("# accelerate "), f
        load_config(f)


def test_optional_fields_are_type_checked_and_coerced(tmp_path):
    # `float | None` fields: YAML 1.1 reads 5e-4 as a string; it must still become a float
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 5e-4, head_lr: 1e-2, max_grad_norm: 1}\n")
    cfg = load_config(path)
    assert isinstance(cfg.train.lr, float) and cfg.train.head_lr == pytest.approx(1e-2)
    assert isinstance(cfg.train.max_grad_norm, float)
    with pytest.raises(ConfigError, match="train.head_lr must be a number"):
        load_config(None, ["train.head_lr=fast"])
    with pytest.raises(ConfigError, match="method.r must be an integer"):
        load_config(None, ["method.r=big"])
    # text settings keep the text as typed: a commit prefix, a tag, a column named 1e5
    typed = load_config(None, ["model.revision=7e10423", "data.text=1e5", "data.label=1.10"])
    assert (typed.model.revision, typed.data.text, typed.data.label) == ("7e10423", "1e5", "1.10")
    assert load_config(None, ["model.revision=null"]).model.revision is None
    # data.train_size is a count or a fraction: a count is saved as written, 16 not 16.0
    count = load_config(None, ["data.path=d", "data.train_size=16"])
    assert "train_size: 16\n" in count.to_yaml()
    assert load_config(None, ["data.path=d", "data.train_size=0.25"]).data.train_size == 0.25


def test_per_method_settings_are_documented_as_method_defaults():
    rows = {key: (default, doc) for key, default, doc in config_docs()}
    for key in ("train.lr", "train.steps", "train.head_lr", "train.select_best", "method.r"):
        default, doc = rows[key]
        assert default == "None" and ("method's default" in doc or "recipe" in doc), key
    # resolved in every RunConfig: never None once built
    cfg = RunConfig()
    assert None not in (cfg.train.lr, cfg.train.steps, cfg.train.head_lr, cfg.train.select_best)
    assert None not in (cfg.method.r, cfg.method.alpha)


def test_report_to_takes_accelerate_trackers():
    from accelerate.utils import LoggerType

    for tracker in LoggerType:
        assert load_config(None, [f"output.report_to=[{tracker.value}]"]).output.report_to
    assert load_config(None, ["output.report_to=[]"]).output.report_to == []


def test_early_stopping_metric_is_checked_against_the_task():
    from lorafit.config import selection_metric_for

    cfg = load_config(None, ["model.task=classification", "train.early_stopping.metric=f1_macro"])
    assert selection_metric_for(cfg.train, "classification") == "f1_macro"
    with pytest.raises(ConfigError, match="is not a classification metric"):
        load_config(None, ["model.task=classification", "train.early_stopping.metric=perplexity"])
    auto = RunConfig().train  # auto: accuracy for classification, else loss
    assert selection_metric_for(auto, "classification") == "accuracy"
    assert selection_metric_for(auto, "causal_lm") == "loss"


def test_calibration_means_temperature_for_classification_only():
    from lorafit.config import TrainConfig, calibration_for

    assert calibration_for(TrainConfig(), "classification") == "temperature"
    assert calibration_for(TrainConfig(), "causal_lm") == "none"
    assert calibration_for(TrainConfig(calibration="none"), "classification") == "none"
    with pytest.raises(ConfigError, match="train.calibration=none for causal LMs"):
        calibration_for(TrainConfig(calibration="temperature"), "causal_lm")
    with pytest.raises(ConfigError, match="train.calibration"):
        TrainConfig(calibration="platt")


def test_other_tools_key_names_point_at_real_keys():
    from lorafit.config import _OTHER_TOOLS_KEYS

    for theirs, ours in _OTHER_TOOLS_KEYS.items():
        node = RunConfig()
        for part in ours.split("."):
            assert hasattr(node, part), f"{theirs} -> {ours}: no {part}"
            node = getattr(node, part)
