"""`lorafit compare`: a method x label budget (K) x seed grid of ordinary runs, then a report.

Flow: sweep YAML (+ overrides) -> SweepConfig -> one RunConfig per (method, K, seed, hyper-parameter
choice) -> each run is a normal run directory under `<sweep.dir>/runs/`, trained by its own
`python -m lorafit train` process -> `lorafit.report` reads the run directories back and writes the
tables, plots and report.md.

Why one process per run: a crash stays inside its run, the peak memory that a run records is its
own (ru_maxrss is per process), and N workers map onto N GPUs (or share the CPU threads).
Resumable: a run whose summary.json says "completed" is never run again; a crashed one is
reported as crashed until `--retry-failed` reruns it (from its last checkpoint when it has one).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import itertools
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

import yaml

from lorafit.config import (
    DataConfig,
    RunConfig,
    _f,
    _unknown_key,
    apply_overrides,
    from_dict,
    load_yaml,
)
from lorafit.errors import ConfigError, LorafitError
from lorafit.io import write_json, write_text
from lorafit.rundir import RunDir, changed_settings, read_summary

# The five data seeds of LM-BFF (Gao et al. 2021); `seeds: N` takes the first N.
LMBFF_SEEDS = (13, 21, 42, 87, 100)
# Metrics that the paired tests of lorafit.metrics resample.
SWEEP_METRICS = ("accuracy", "f1_macro")
# Keys each run gets from the sweep; setting them in `base` or a method would be silently lost.
SWEEP_OWNED_KEYS = {
    "data.k_shot": "sweep.k_shots",
    "data.k_shot_unit": "sweep.k_shot_unit",
    "data.train_size": "sweep.k_shots",
    "data.seed": "sweep.seeds",
    "train.seed": "sweep.seeds",
    "train.resume": "the sweep (it resumes crashed runs itself)",
    "output.dir": "sweep.dir",
    "output.overwrite": "the sweep (finished runs are kept)",
}


@dataclass
class SweepConfig:
    dir: str = _f("runs/compare", "Sweep directory: run directories, tables, plots, report.")
    methods: dict[str, Any] = _f(
        {}, "Method name -> partial run config; its `method:` section is the whole method."
    )
    k_shots: list[int] = _f([16], "Label budgets K (see k_shot_unit).")
    k_shot_unit: str = _f("per_class", "per_class: K per class; total: K examples, stratified.")
    seeds: Union[int, list[int]] = _f(
        5, "Seeds (each sets data.seed and train.seed), or N: the first N LM-BFF seeds."
    )
    grid: dict[str, Any] = _f(
        {}, "Method -> {section.key: [values]}: chosen per seed on validation, never on test."
    )
    baseline: str | None = _f(None, "Method the others are tested against (default: the first).")
    metric: str = _f("accuracy", "Test metric of the tables, tests and plots: accuracy | f1_macro.")
    paired_test: str = _f(
        "bootstrap",
        "bootstrap | permutation: the p-value that Holm's correction adjusts (the exact "
        "permutation test cannot go under 2/2^seeds).",
    )
    n_resamples: int = _f(10000, "Resamples of the paired bootstrap and permutation tests.")
    ci_level: float = _f(0.95, "Level of the confidence intervals across seeds.")
    workers: int = _f(
        1, "Runs at once, one process each (round-robin over GPUs; CPU threads split)."
    )
    keep_checkpoints: bool = _f(
        False, "Keep checkpoints/ of completed runs (only a crashed run resumes from them)."
    )

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("sweep.methods is empty; add e.g. `lora: {method: {name: lora}}`")
        if not self.k_shots or any(k <= 0 for k in self.k_shots):
            raise ConfigError(f"sweep.k_shots={self.k_shots!r} needs one or more positive K")
        if len(set(self.k_shots)) != len(self.k_shots):
            raise ConfigError(f"sweep.k_shots={self.k_shots!r} lists a K twice")
        if self.k_shot_unit not in ("per_class", "total"):
            raise ConfigError(
                f"sweep.k_shot_unit={self.k_shot_unit!r} is not valid; use per_class or total"
            )
        if isinstance(self.seeds, int):
            if self.seeds <= 0:
                raise ConfigError(f"sweep.seeds={self.seeds} must be > 0 (or a list of seeds)")
            extra = range(LMBFF_SEEDS[-1] + 1, LMBFF_SEEDS[-1] + 1 + self.seeds)
            self.seeds = list(itertools.islice(itertools.chain(LMBFF_SEEDS, extra), self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"sweep.seeds={self.seeds!r} needs distinct seeds")
        if self.baseline is None:
            self.baseline = next(iter(self.methods))
        if self.baseline not in self.methods:
            raise ConfigError(
                f"sweep.baseline={self.baseline!r} is not one of sweep.methods {list(self.methods)}"
            )
        if self.metric not in SWEEP_METRICS:
            raise ConfigError(
                f"sweep.metric={self.metric!r} is not valid; use one of {list(SWEEP_METRICS)}"
            )
        if self.paired_test not in ("permutation", "bootstrap"):
            raise ConfigError(
                f"sweep.paired_test={self.paired_test!r} is not valid; use permutation or bootstrap"
            )
        if self.n_resamples < 100:
            raise ConfigError(f"sweep.n_resamples={self.n_resamples} must be >= 100")
        if not 0 < self.ci_level < 1:
            raise ConfigError(f"sweep.ci_level={self.ci_level!r} must be between 0 and 1")
        if self.workers <= 0:
            raise ConfigError(f"sweep.workers={self.workers} must be > 0")
        for name in self.grid:
            if name not in self.methods:
                raise ConfigError(
                    f"sweep.grid.{name} names no method; use one of {list(self.methods)}"
                )


@dataclass(frozen=True)
class Run:
    """One cell of the grid: a method at one K and seed, with one hyper-parameter choice."""

    method: str
    k_shot: int
    seed: int
    hp: tuple[tuple[str, Any], ...]  # (dotted key, value) from sweep.grid; () without a grid
    config: RunConfig

    @property
    def cell(self) -> str:
        """The id shared by the grid variants among which validation chooses."""
        return run_id(self.method, self.k_shot, self.seed, ())

    @property
    def id(self) -> str:
        return run_id(self.method, self.k_shot, self.seed, self.hp)

    @property
    def dir(self) -> Path:
        return Path(self.config.output.dir)


@dataclass
class SweepFile:
    """The shape of a compare config, which types its `key=value` overrides."""

    sweep: SweepConfig
    base: RunConfig


@dataclass
class Sweep:
    config: SweepConfig
    base: dict[str, Any]
    runs: list[Run]

    @property
    def dir(self) -> Path:
        return Path(self.config.dir)


# ----------------------------------------------------------------------------------- config
def load_sweep(path: str | Path | None, overrides: list[str] | None = None) -> Sweep:
    """Sweep YAML (`sweep:` + `base:`) + `sweep.x=...` / `base.train.x=...` overrides -> Sweep."""
    data = (
        load_yaml(path, example="configs/compare_sst2_ci.yaml", saved="sweep.yaml") if path else {}
    )
    data = apply_overrides(data, overrides or [], SweepFile)
    return build_sweep(data)


def build_sweep(data: dict[str, Any]) -> Sweep:
    if "sweep" not in data and not any(str(k).startswith("sweep") for k in data):
        raise ConfigError(
            "a compare config needs a top-level `sweep:` section (methods, k_shots, seeds) and "
            "`base:` (a run config); for a single run use `lorafit train`"
        )
    for key in data:
        if key not in ("sweep", "base"):
            raise _unknown_key("", str(key), ["sweep", "base"])
    cfg = from_dict(SweepConfig, data["sweep"] or {}, prefix="sweep.")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"base must be a mapping of run config sections, got {base!r}")
    if "method" in base:
        raise ConfigError("base.method is not used: each entry of sweep.methods has its method")
    _check_not_owned(base, "base")
    from_dict(RunConfig, base, prefix="base.")  # names a bad base key before anything else

    methods = {}
    for name, entry in cfg.methods.items():
        entry = copy.deepcopy(entry) if entry is not None else {}
        if not isinstance(entry, dict):
            raise ConfigError(f"sweep.methods.{name} must be a mapping of run config sections")
        entry.setdefault("method", {}).setdefault("name", name)
        _check_not_owned(entry, f"sweep.methods.{name}")
        try:
            from_dict(RunConfig, entry, prefix=f"sweep.methods.{name}.")
        except ConfigError as e:  # a bad value names its run-config key: say where it is set
            where = f"sweep.methods.{name}"
            raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        methods[name] = entry
    cfg.methods = methods
    cfg.grid = {name: _parse_grid(name, grid) for name, grid in cfg.grid.items()}

    sweep_dir = Path(cfg.dir).absolute()
    runs = []
    for name, entry in methods.items():
        for k in cfg.k_shots:
            for seed in cfg.seeds:
                for hp in _grid_points(cfg.grid.get(name, {})):
                    run_dict = _merge(base, entry)
                    _set(run_dict, "data.k_shot", k)
                    _set(run_dict, "data.k_shot_unit", cfg.k_shot_unit)
                    _set(run_dict, "data.seed", seed)
                    _set(run_dict, "train.seed", seed)
                    for key, value in hp:
                        _set(run_dict, key, value)
                    _set(
                        run_dict, "output.dir", str(sweep_dir / "runs" / run_id(name, k, seed, hp))
                    )
                    where = f"sweep.methods.{name} (K={k}, seed={seed}{_hp_text(hp)})"
                    try:
                        config = from_dict(RunConfig, run_dict)
                    except ConfigError as e:
                        raise ConfigError(f"{where}: {e}") from None
                    runs.append(Run(name, k, seed, hp, config))
    return Sweep(cfg, base, runs)


def _check_not_owned(section: dict, where: str) -> None:
    for dotted, owner in SWEEP_OWNED_KEYS.items():
        head, key = dotted.split(".")
        if isinstance(section.get(head), dict) and key in section[head]:
            raise ConfigError(f"{where}.{dotted} is set by {owner}; remove it from {where}")


def _parse_grid(method: str, grid: Any) -> dict[str, list]:
    where = f"sweep.grid.{method}"
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(
            f"{where} must map section.key to a list of values, e.g. train.lr: [1e-4]"
        )
    parsed = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key} must be a non-empty list of values")
        if key in SWEEP_OWNED_KEYS or "." not in key:
            raise ConfigError(f"{where}.{key} cannot be searched; use e.g. train.lr or method.r")
        parsed[key] = []
        # each value alone must be valid; keep it typed (YAML reads 1e-4 as text)
        for value in values:
            probe: dict[str, Any] = {}
            _set(probe, key, value)
            typed: Any = from_dict(RunConfig, probe, prefix=f"{where}.")
            for part in key.split("."):
                typed = getattr(typed, part)
            # each value names a run folder (hp_label): a repeat would train into the same one
            if any(hp_label(((key, typed),)) == hp_label(((key, v),)) for v in parsed[key]):
                raise ConfigError(f"{where}.{key} lists {typed!r} twice; list each value once")
            parsed[key].append(typed)
    return parsed


def _grid_points(grid: dict[str, list]) -> list[tuple[tuple[str, Any], ...]]:
    if not grid:
        return [()]
    keys = list(grid)
    return [tuple(zip(keys, values)) for values in itertools.product(*grid.values())]


def run_id(method: str, k_shot: int, seed: int, hp: tuple) -> str:
    """`<method>/k<K>/seed<S>[/<grid point>]`: also the run's folder under `runs/`."""
    cell = f"{method}/k{k_shot}/seed{seed}"
    return f"{cell}/{hp_label(hp)}" if hp else cell


def hp_label(hp: tuple[tuple[str, Any], ...]) -> str:
    """A folder name for one grid point: (('train.lr', 1e-4), ('method.r', 4)) -> lr-0.0001_r-4."""
    return "_".join(f"{key.split('.')[-1]}-{value}" for key, value in hp).replace("/", "-")


def _hp_text(hp) -> str:
    return "".join(f", {k}={v}" for k, v in hp)


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


# -------------------------------------------------------------------------------- execution
@dataclass
class Outcome:
    ok: bool
    error: str | None
    seconds: float


# launch(run, config_path, log_path, env) -> Outcome; tests swap in a fake trainer.
Launcher = Callable[[Run, Path, Path, dict], Outcome]


class SweepState:
    """`state.json`: per run id the last launch's status, error line and process time.

    Only the main process writes it. summary.json stays the authority on completion.
    """

    def __init__(self, path: Path):
        self.path = path
        self.runs: dict[str, dict] = {}
        self._lock = threading.Lock()  # worker threads record their runs' starts
        if path.exists():
            self.runs = json.loads(path.read_text()).get("runs", {})

    def get(self, run: Run) -> dict:
        return self.runs.get(run.id, {})

    def record(self, run: Run, **fields) -> None:
        with self._lock:
            self.runs[run.id] = {**self.runs.get(run.id, {}), **fields}
            write_json(self.path, {"runs": self.runs})


def run_status(run: Run, state: SweepState, check_data: bool = True) -> str:
    """completed | crashed | pending (never run, or interrupted with the sweep).

    A completed run made under other settings, or (`check_data`) on a data file that has been
    edited since, is refused: reusing it would mix two experiments in one table."""
    summary = read_summary(run.dir)
    if summary.get("status") == "completed":
        if summary.get("config_sha256") not in (None, run.config.fingerprint()):
            changed = changed_settings(run.dir, run.config)
            if changed:
                raise ConfigError(
                    f"run {run.dir} was trained with other settings than sweep run {run.id} now "
                    f"has ({'; '.join(changed[:3])}); restore them or choose a new sweep.dir"
                )
        if check_data:
            _check_same_data(run, summary.get("data_sha256") or {})
        return "completed"
    recorded = state.get(run)
    if recorded.get("status") != "crashed":
        return "pending"
    # a crash under other settings (a config mistake since fixed) is not this run's result
    same = recorded.get("config_sha256") in (None, run.config.fingerprint())
    return "crashed" if same else "pending"


def _check_same_data(run: Run, trained_on: dict[str, str]) -> None:
    """Refuse a finished run whose data files (their sha256 in summary.json) have changed, or
    been added or removed. Runs of a lorafit that did not record them are not checked."""
    from lorafit.data import changed_data_files, data_files_sha256

    now = data_files_sha256(run.config.data)
    if trained_on and now and now != trained_on:  # a missing data.path fails in _check_data
        raise ConfigError(
            f"run {run.dir} was trained on other data: {changed_data_files(trained_on, now)} "
            f"since, in {run.config.data.path} (data.path); restore it, or choose a new "
            "sweep.dir to run the sweep on the new data"
        )


def _check_runs_share_data(sweep: Sweep) -> None:
    """--report-only: the finished runs must have been trained on the same data files, even
    when those files have changed since (the report is about the runs, not today's files)."""
    from lorafit.data import changed_data_files

    first: dict[str, tuple[dict, str]] = {}  # data setting -> (data_sha256, run id)
    for run in sweep.runs:
        digests = read_summary(run.dir).get("data_sha256")
        if not digests:
            continue  # not finished, a hub dataset, or a lorafit that did not record them
        data = run.config.data  # the settings that choose the files, not the K-shot draw
        setting = json.dumps([data.path, data.train_split, data.validation_split, data.test_split])
        seen, other = first.setdefault(setting, (digests, run.id))
        if seen != digests:
            raise ConfigError(
                f"runs {other} and {run.id} were trained on different data "
                f"({changed_data_files(seen, digests)} between them), so they cannot share a "
                "table; rerun the sweep into a new sweep.dir"
            )


def execute(
    sweep: Sweep,
    retry_failed: bool = False,
    launch: Launcher | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Train every run that is not finished; returns counts of completed/crashed/skipped runs."""
    from tqdm.auto import tqdm

    launch = launch or launch_subprocess
    state = SweepState(sweep.dir / "state.json")
    todo, counts = [], {"skipped": 0, "completed": 0, "crashed": 0, "kept_crashed": 0}
    for run in sweep.runs:
        status = run_status(run, state)
        if status == "completed":
            counts["skipped"] += 1
            if state.get(run).get("status") != "completed":  # finished after its sweep died
                _finish(run, sweep, state)
        elif status == "crashed" and not retry_failed:
            counts["kept_crashed"] += 1
        else:
            todo.append(run)
    if counts["kept_crashed"]:
        print(
            f"lorafit compare: {counts['kept_crashed']} crashed run(s) are reported, not rerun; "
            "pass --retry-failed to rerun them",
            file=sys.stderr,
        )
    if not todo:
        return counts

    slots: queue.Queue[int] = queue.Queue()
    for slot in range(sweep.config.workers):
        slots.put(slot)
    devices = _worker_devices()

    stopping = threading.Event()  # Ctrl-C: launch nothing more

    def work(run: Run) -> Outcome:
        slot = slots.get()
        name = run.id.replace("/", "__")
        try:
            # held by this launch and its child: a launch left running by a killed sweep
            # finishes (or dies) before this one touches its run directory
            with _run_lock(sweep.dir / "locks" / f"{name}.lock", run) as lock_fd:
                if RunDir(run.dir).is_complete():  # it finished meanwhile
                    return Outcome(True, None, 0.0)
                state.record(
                    run,
                    status="running",
                    error=None,
                    started=time.time(),
                    config_sha256=run.config.fingerprint(),
                )
                config_path = sweep.dir / "configs" / f"{name}.yaml"
                log_path = sweep.dir / "logs" / f"{name}.log"
                _prepare_run_dir_for_launch(run)
                config = copy.deepcopy(run.config)
                config.train.resume = run.dir.exists()
                write_text(
                    config_path,
                    f"# lorafit train {shlex.quote(str(config_path))}\n" + config.to_yaml(),
                )
                log_path.parent.mkdir(parents=True, exist_ok=True)
                env = _worker_env(slot, sweep.config.workers, devices)
                env[LOCK_FD_VARIABLE] = str(lock_fd)
                if stopping.is_set():  # picked up while the sweep was being interrupted
                    return Outcome(False, "not started: the sweep was interrupted", 0.0)
                return launch(run, config_path, log_path, env)
        finally:
            slots.put(slot)

    done_before = len(sweep.runs) - len(todo)
    bar = tqdm(total=len(sweep.runs), initial=done_before, desc="compare", disable=not progress)
    bar.set_postfix_str(f"{len(todo)} to run, {sweep.config.workers} worker(s)")
    pool = ThreadPoolExecutor(max_workers=sweep.config.workers)
    try:
        futures = {}
        earlier_seconds = {}  # process time of the launches a resumed run continues
        for run in todo:
            earlier_seconds[run.id] = (
                state.get(run).get("process_time_s", 0.0) if _resumes(run) else 0.0
            )
            futures[pool.submit(work, run)] = run
        for future in as_completed(futures):
            run = futures[future]
            try:
                outcome = future.result()
            except Exception as e:  # a launcher failure is that run's crash, not the sweep's
                outcome = Outcome(False, f"{type(e).__name__}: {e}".splitlines()[0], 0.0)
            done = outcome.ok and read_summary(run.dir).get("status") == "completed"
            if done:
                _drop_checkpoints(run, sweep)
            error = None if done else (outcome.error or "exited without summary.json")
            state.record(
                run,
                status="completed" if done else "crashed",
                error=error,
                process_time_s=round(earlier_seconds[run.id] + outcome.seconds, 2),
            )
            counts["completed" if done else "crashed"] += 1
            bar.update(1)
            bar.set_postfix_str(f"{run.id}: {'ok' if done else 'CRASHED'}")
            if not done:
                bar.write(f"lorafit compare: {run.id} crashed: {error}")
    except KeyboardInterrupt:
        # Launch nothing more, and stop the trainings in flight (a Ctrl-C in a terminal reaches
        # them too; `kill -INT` of the sweep does not). Their runs stay "running" in state.json,
        # which a rerun of the same command resumes from their last checkpoints.
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        interrupt_children()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return counts


def _drop_checkpoints(run: Run, sweep: Sweep) -> None:
    if not sweep.config.keep_checkpoints:
        # optimizer state + weights: ~700 MB per full fine-tuning run of MiniLM
        shutil.rmtree(RunDir(run.dir).checkpoints, ignore_errors=True)


def _finish(run: Run, sweep: Sweep, state: SweepState) -> None:
    """A run that completed without its sweep watching (a launch that outlived a killed sweep):
    record it, and drop its checkpoints as a watched run's are dropped."""
    _drop_checkpoints(run, sweep)
    state.record(run, status="completed", error=None)


# The fd of a run's lock, passed to its `lorafit train` so that the child holds the lock too.
LOCK_FD_VARIABLE = "LORAFIT_SWEEP_LOCK_FD"


@contextlib.contextmanager
def _run_lock(path: Path, run: Run) -> Iterator[int]:
    """An exclusive lock per run id, shared with the launched child; waits for an earlier
    holder (a launch that outlived a killed sweep) with a line that says so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"lorafit compare: {run.id} is still being trained by an earlier launch; "
                "waiting for it to end",
                file=sys.stderr,
            )
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield fh.fileno()


def _resumes(run: Run) -> bool:
    """Whether a launch of `run` continues from a checkpoint of an earlier launch."""
    checkpoints = RunDir(run.dir).checkpoints
    return checkpoints.exists() and any(checkpoints.iterdir())


def _prepare_run_dir_for_launch(run: Run) -> None:
    """Continue from the newest checkpoint; a folder without one, or trained with other
    settings (a crash before the config was fixed), holds nothing worth keeping."""
    if not run.dir.exists():
        return
    if not _resumes(run) or changed_settings(run.dir, run.config):
        shutil.rmtree(run.dir)


def _worker_devices() -> list[str]:
    """GPU ids the workers share round-robin ([] on CPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable torch/CUDA: CPU workers
        return []


# Set by torchrun / accelerate launch: a run started from a launched sweep is its own
# single-process job, so it must not inherit the sweep's process group.
LAUNCHER_VARIABLES = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)


def _worker_env(slot: int, workers: int, devices: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    elif workers > 1:  # CPU: give each worker its share of the cores instead of oversubscribing
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    return env


# Set for a sweep's `lorafit train` child: it asks the kernel to end it when the sweep dies.
PARENT_PID_VARIABLE = "LORAFIT_SWEEP_PID"


def die_with_sweep() -> None:
    """In a sweep's child: SIGTERM when the sweep process dies (Linux), so that a killed sweep
    leaves no training behind; exits at once when the sweep is already gone."""
    parent = os.environ.get(PARENT_PID_VARIABLE)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the sweep died before the request: nobody is waiting
        sys.exit(1)


# The trainings `launch_subprocess` has running, for `interrupt_children`.
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()


def interrupt_children() -> None:
    """SIGINT to every running training this process launched: each stops as after a Ctrl-C,
    its last checkpoint on disk."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGINT)


def launch_subprocess(run: Run, config_path: Path, log_path: Path, env: dict) -> Outcome:
    """`python -m lorafit train CONFIG` with its output in the log; the error is its last line."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} lorafit train {config_path}\n")
        log.flush()
        lock = env.get(LOCK_FD_VARIABLE)
        child = subprocess.Popen(
            [sys.executable, "-m", "lorafit", "train", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, PARENT_PID_VARIABLE: str(os.getpid())},
            pass_fds=(int(lock),) if lock else (),
            start_new_session=True,  # a terminal's Ctrl-C reaches the sweep, which forwards one
        )
        with _CHILDREN_LOCK:
            _CHILDREN.add(child)
        try:
            code = child.wait()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(child)
    seconds = time.perf_counter() - start
    if code == 0:
        return Outcome(True, None, seconds)
    if code < 0:  # killed: whatever it printed last is not the reason
        return Outcome(False, _signal_text(-code), seconds)
    return Outcome(False, f"exit code {code}: {_error_line(log_path)}", seconds)


def _signal_text(number: int) -> str:
    """killed by signal 9 (SIGKILL; out of memory?): the kernel's OOM killer sends SIGKILL."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"killed by signal {number}"
    hint = "; out of memory?" if number == signal.SIGKILL else ""
    return f"killed by signal {number} ({name}{hint})"


# A tqdm progress-bar update, e.g. `train:  67%|██████▋   | 8/12 [00:01<00:00, 7.1step/s]`
_PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")


def _error_line(log_path: Path) -> str:
    """The `lorafit: error:` line if the run printed one, else the last line that is not a
    progress-bar update (the traceback's last line)."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line and not _PROGRESS_BAR.search(line)]
    for line in reversed(lines):
        if line.startswith("lorafit: error:"):
            return line[len("lorafit: error:") :].strip()
    return lines[-1] if lines else "no output"


# ---------------------------------------------------------------------------------- command
class CompareResult(NamedTuple):
    report: Path  # report.md
    crashed: list[str]  # ids of the runs that crashed (reported; --retry-failed reruns them)


def run_compare(
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    retry_failed: bool = False,
    report_only: bool = False,
    launch: Launcher | None = None,
) -> CompareResult:
    """`lorafit compare`: run what is missing, then write the tables, plots and report."""
    from lorafit import report
    from lorafit.distributed import launcher_world_size

    sweep = load_sweep(config_path, overrides)
    world = launcher_world_size()
    if world > 1:
        # Under `accelerate launch` / torchrun with N processes: the main process runs the
        # sweep with N workers (one run per device or CPU share); the other ranks have nothing
        # to do, so nothing is run or written twice.
        if int(os.environ.get("RANK", "0")) != 0:
            return CompareResult(sweep.dir / "report.md", [])
        sweep.config.workers = max(sweep.config.workers, world)
    if not report_only:
        _check_data(sweep)
    elif not any(RunDir(run.dir).is_complete() for run in sweep.runs):
        raise ConfigError(
            f"--report-only: no run of this sweep has finished in {sweep.dir} (sweep.dir); "
            "run `lorafit compare` without --report-only first, or point sweep.dir at the sweep"
        )
    state = SweepState(sweep.dir / "state.json")
    for run in sweep.runs:  # refuses finished runs made with other settings: before any write
        run_status(run, state, check_data=not report_only)
    if report_only:
        _check_runs_share_data(sweep)
    if not report_only:  # a --report-only what-if (other seeds, a metric) leaves the record alone
        write_text(
            sweep.dir / "sweep.yaml",
            f"# lorafit compare {shlex.quote(str(sweep.dir / 'sweep.yaml'))} --report-only\n"
            + yaml.safe_dump(
                {"sweep": _plain(sweep.config), "base": sweep.base}, sort_keys=False, width=100
            ),
        )
        execute(sweep, retry_failed=retry_failed, launch=launch)
    path = report.write_report(sweep)
    print(f"report: {path}")
    state = SweepState(sweep.dir / "state.json")  # as execute left it
    crashed = [r.id for r in sweep.runs if run_status(r, state, check_data=False) == "crashed"]
    return CompareResult(path, crashed)


def _check_data(sweep: Sweep) -> None:
    """Load each distinct data setting of the grid once (one seed per K) before training, so a
    wrong column, a K the data cannot give or SFT data is one error, not a crash per run; its
    warnings (an unused test file, leakage) print here, in the sweep's own output. Hub datasets
    are left to the runs (no download up front)."""
    from lorafit.data import infer_task, load_task_data, looks_local

    checked = set()
    for run in sweep.runs:
        task, data = run.config.model.task, run.config.data
        if data.path is None or not looks_local(data.path):
            continue
        # the seed changes which rows are drawn, not whether they can be
        setting = dataclasses.asdict(dataclasses.replace(data, seed=0))
        decides = json.dumps([task, setting], sort_keys=True, default=str)
        if decides in checked:
            continue
        checked.add(decides)
        try:
            task = infer_task(data) if task == "auto" else task
            if task != "causal_lm":
                load_task_data(data, task)
        except LorafitError as e:
            raise ConfigError(f"{run.id}: {_sweep_keys(str(e))}") from None
        if task == "causal_lm":
            raise causal_lm_error(sweep, run.id)


def _sweep_keys(message: str) -> str:
    """A run's data error in the sweep's own keys: data.k_shot is sweep.k_shots, data.x base.data.x."""
    message = re.sub(r"(?<![\w./\\-])data\.k_shot_unit\b", "sweep.k_shot_unit", message)
    message = re.sub(r"(?<![\w./\\-])data\.k_shot\b", "sweep.k_shots", message)
    # only the settings' own names: a file called data.csv in the message stays as it is
    fields = "|".join(f.name for f in dataclasses.fields(DataConfig) if "k_shot" not in f.name)
    return re.sub(rf"(?<![\w./\\-])data\.({fields})\b", r"base.data.\1", message)


def causal_lm_error(sweep: Sweep, run_id: str) -> ConfigError:
    return ConfigError(
        f"lorafit compare reports classification metrics (sweep.metric={sweep.config.metric}), "
        f"but {run_id} is causal-LM instruction tuning; run each method with `lorafit train` "
        "and compare their test loss and its CI in summary.json"
    )


def _plain(cfg: SweepConfig) -> dict:
    import dataclasses

    d = dataclasses.asdict(cfg)
    d["dir"] = str(Path(cfg.dir).absolute())
    return d
