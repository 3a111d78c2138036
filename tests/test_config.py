import pytest
import yaml

from lorafit.config import RunConfig, config_docs, load_config
from lorafit.errors import ConfigError


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
    "override, message",
    [
        (["train.lrr=1"], "did you mean 'train.lr'"),
        (["trian.lr=1"], "did you mean 'train'"),
        (["train.early_stoping.patience=2"], "did you mean 'train.early_stopping'"),
        (["train.steps=-3"], "train.steps=-3 must be > 0"),
        (["train.steps=abc"], "train.steps must be an integer"),
        (["method.dropout=1.5"], "method.dropout"),
        (["train.schedule=step"], "train.schedule='step' is not valid"),
        (["data.k_shot=4", "data.train_size=0.5"], "exclusive"),
        (["train.resume=maybe"], "train.resume must be true or false"),
        (["oops"], "must look like section.key=value"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml line"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


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
