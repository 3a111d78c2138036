"""The run directory: the seam between training, sweeps and export (see docs/design.md)."""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import ConfigError
from lorafit.io import read_jsonl, write_text, write_with


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def label_map(self) -> Path:
        return self.root / "label_map.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions" / "test.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def learning_curve(self) -> Path:
        return self.root / "learning_curve.png"

    @property
    def tracker_dir(self) -> Path:
        return self.root / "tb"

    def is_complete(self) -> bool:
        return read_summary(self.root).get("status") == "completed"


def read_summary(root: str | Path) -> dict:
    path = Path(root) / "summary.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


# Everything `lorafit train` writes into output.dir (see RunDir); `.<name>.*.tmp` files are
# atomic writes cut short by a crash (lorafit.io).
RUN_ENTRIES = frozenset(
    {
        "config.yaml",
        "label_map.json",
        "metrics.jsonl",
        "summary.json",
        "predictions",
        "adapter",
        "checkpoints",
        "learning_curve.png",
        "tb",
    }
)


def is_run_dir(root: str | Path) -> bool:
    """A folder holding only what a run writes, with the config.yaml that a run saves.

    A run saves every setting; a hand-written config.yaml states a few. Nearly all (90%) are
    asked for, so that a run of an older lorafit, without the settings added since, still counts.
    """
    from lorafit.config import RunConfig

    run = RunDir(Path(root))
    names = [p.name for p in run.root.iterdir()]
    if not all(n in RUN_ENTRIES or (n.startswith(".") and n.endswith(".tmp")) for n in names):
        return False
    try:
        saved = yaml.safe_load(run.config.read_text())
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(saved, dict):
        return False
    settings = [(s, key) for s, keys in RunConfig().to_dict().items() for key in keys]
    stated = sum(isinstance(saved.get(s), dict) and key in saved[s] for s, key in settings)
    return stated >= 0.9 * len(settings)


def flat_settings(d: dict, prefix: str = "") -> dict[str, Any]:
    """A config dict as {"section.key": value}; peft_kwargs stays one value."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "peft_kwargs":
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(root: str | Path, config: Any) -> list[str]:
    """Settings whose value differs between a run folder's saved config.yaml and `config`
    (a RunConfig), as "key: then, now" lines. output.* and train.resume say where results go
    and how the run starts, not what is trained, so they are not compared.

    Keys present on one side only (a lorafit version that added or removed a setting) are not
    differences: only a value both configs state and disagree on makes a run another experiment.
    """
    path = RunDir(Path(root)).config
    if not path.exists():
        return ["its config.yaml is missing"]
    saved = flat_settings(yaml.safe_load(path.read_text()) or {})
    planned = flat_settings(config.to_dict())
    return [
        f"{key}: {saved[key]!r} then, {planned[key]!r} now"
        for key in planned
        if key in saved
        and not key.startswith("output.")
        and key != "train.resume"
        and not _same(saved[key], planned[key])
    ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_run_dir(root: str | Path, overwrite: bool, resume: bool) -> None:
    """Refuse an output.dir that holds something a new run must not mix into or delete."""
    root = Path(root)
    if not root.exists() or not any(root.iterdir()):
        return
    if not is_run_dir(root):  # resume included: it would write a run beside the folder's files
        raise ConfigError(
            f"output.dir {root} is not empty and is not a lorafit run directory, so lorafit will "
            "not write into it or delete it (even with output.overwrite=true); choose another "
            "output.dir or delete that folder yourself"
        )
    if not overwrite and not resume:
        raise ConfigError(
            f"output.dir {root} already holds a run; pass train.resume=true to continue "
            "it, output.overwrite=true to replace it, or choose another output.dir"
        )


def prepare_run_dir(root: str | Path, overwrite: bool, resume: bool) -> RunDir:
    """Create the run directory; replace an old run only when asked, and nothing but a run."""
    check_run_dir(root, overwrite, resume)
    run = RunDir(Path(root))
    if overwrite and not resume and run.root.exists():
        shutil.rmtree(run.root)  # a run directory (or an empty folder): checked above
    run.root.mkdir(parents=True, exist_ok=True)
    return run


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop evaluations logged after the checkpoint we continue from."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_learning_curve(
    metrics_path: Path,
    out_path: Path,
    metric: str,
    best_step: int | None,
    tested_step: int | None,
    refit_rows: int | None = None,
    refit_steps: int | None = None,
):
    """Train vs validation loss and metric over steps: the overfitting picture at a glance.

    A solid line marks the step whose weights were tested; a dashed one the best validation
    step when that is another (train.select_best=false keeps the last step). After a refit
    (`refit_steps` steps on `refit_rows` rows of train + validation) the solid line marks the
    monitored run's step whose weights the refit replaced: the refit has no validation curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if metric == "loss":  # a causal LM selects on loss: show its next-token accuracy beside it
        metric = "top1_accuracy"
    for ax, key, title in ((axes[0], "loss", "loss (NLL)"), (axes[1], metric, metric)):
        for split, style in (("train", "-o"), ("validation", "-s")):
            values = [r.get(split, {}).get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(steps, values, style, label=f"{split}", markersize=3)
        if tested_step is not None:
            which = "best" if tested_step == best_step else "last"
            label = f"tested: {which} step {tested_step}"
            if refit_rows:
                label = (
                    f"{which} step {tested_step}; refit: {refit_steps} steps on {refit_rows} "
                    "rows, tested"
                )
            ax.axvline(tested_step, color="black", label=label)
        if best_step is not None and best_step != tested_step:
            ax.axvline(
                best_step,
                color="grey",
                linestyle="--",
                label=f"best validation {best_step} (not used)",
            )
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    title = "train (fixed sample) vs validation: read the gap's growth from step 0"
    if refit_rows:
        title += "\n(the monitored run; the tested model was refit on train + validation)"
    fig.suptitle(title)
    fig.tight_layout()
    write_with(out_path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


def environment_info() -> dict:
    """Library versions and hardware, recorded in every summary."""
    import accelerate
    import peft
    import torch
    import transformers

    import lorafit

    hardware = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {
        "versions": {
            "lorafit": lorafit.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
        "hardware": hardware,
    }
