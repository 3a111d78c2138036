"""Worker for tests/test_distributed.py: train one or more configs under a launcher.

    torchrun --standalone --nproc_per_node 2 tests/dist_workers/train_worker.py SPEC.json

SPEC.json: {"out": folder outside every run dir, "jobs": [{"name": str, "overrides": [k=v, ...]}]}.
Per job and rank it writes OUT/<name>.rank<r>.json: a hash of the trainable weights after
training (gathered: complete on every rank), the test metrics and what the rank saw
(num_processes, rank, whether its parameters are shards). On ranks other than 0 it also records
every file-system write (open for writing, mkdir, rename, safetensors save) into
OUT/writes.rank<r>.json, so the test can check that only rank 0 writes into the run directory.

LORAFIT_TEST_FSDP2=1 shards the model with FSDP2 on CPU (`_fsdp2_on_cpu`).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import sys

import torch

RANK = int(os.environ.get("RANK", "0"))
_real_open = builtins.open
WRITES: list[str] = []


def _record(path) -> None:
    try:
        WRITES.append(os.path.abspath(os.fspath(path)))
    except TypeError:  # file descriptors
        pass


def _audit() -> None:
    """Wrap the write paths of the standard library and safetensors (ranks > 0 only)."""

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _record(file)
        return _real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = open_
    for mod, name in ((os, "mkdir"), (os, "makedirs"), (os, "replace"), (os, "rename")):
        real = getattr(mod, name)

        def wrapped(path, *args, _real=real, _name=name, **kwargs):
            _record(path)
            if args and _name in ("replace", "rename"):
                _record(args[0])
            return _real(path, *args, **kwargs)

        setattr(mod, name, wrapped)
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        _record(path)
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        _record(filename)
        return real_save(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_file


def _fsdp2_on_cpu() -> None:
    """Make accelerate shard with FSDP2 on CPU (gloo), so lorafit's sharded paths run for real.

    accelerate selects FSDP on GPUs only (on CPU an FSDP launch runs DDP). This switches the
    state of every Accelerator built from now on to FSDP2 with the settings of
    configs/accelerate/fsdp.yaml (transformer-based wrap, reshard after forward, fp32), so that
    `accelerator.prepare` shards with torch's `fully_shard` and every parameter is a DTensor
    shard: dist.read_full / write_full, the gathered adapter save, checkpoints and resume run
    as they would on GPUs.
    """
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class FSDP2Accelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # both: a later AcceleratorState() copies the partial state over its own
            PartialState().distributed_type = DistributedType.FSDP
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2,
                auto_wrap_policy="transformer_based_wrap",
                reshard_after_forward=True,
                state_dict_type="FULL_STATE_DICT",
            )

    accelerate.Accelerator = FSDP2Accelerator


@torch.no_grad()
def write_read_round_trip(trainer) -> float:
    """Largest error of write_full then read_full of the trained weights and the head (restored)."""
    from lorafit import distributed as dist

    acc, model = trainer.accelerator, trainer.model
    params = {**trainer.trainable, **trainer._head_params()}
    before = dist.read_full(acc, model, params)
    moved = {
        k: v + 0.5 + 0.01 * torch.arange(v.numel()).reshape(v.shape) for k, v in before.items()
    }
    dist.write_full(acc, model, params, moved)
    after = dist.read_full(acc, model, params)
    dist.write_full(acc, model, params, before)
    return max(float((after[k] - moved[k]).abs().max()) for k in moved)


def _local(param):
    """This rank's part of a parameter: its shard under FSDP2 (a DTensor), else all of it."""
    return param.to_local() if hasattr(param, "to_local") else param


def weights_hash(params: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    spec = json.loads(_real_open(sys.argv[1]).read())
    out = spec["out"]
    if RANK != 0:
        _audit()  # before lorafit binds safetensors.save_file
        with open(
            os.path.join(out, f"probe.rank{RANK}"), "w"
        ) as fh:  # proves the audit sees writes
            fh.write("probe\n")

    if os.environ.get("LORAFIT_TEST_FSDP2") == "1":
        _fsdp2_on_cpu()
    from lorafit.config import load_config
    from lorafit.distributed import leave_process_group, read_full
    from lorafit.trainer import Trainer

    for job in spec["jobs"]:
        trainer = Trainer(load_config(None, job["overrides"]))
        trainer.setup()
        summary = trainer.train()
        acc = trainer.accelerator
        full = read_full(acc, trainer.model, trainer.trainable)  # collective when sharded
        head = trainer._head_params()  # the head too: a contrastive head is fitted
        result = {
            "rank": acc.process_index,
            "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type),
            "backend": str(getattr(acc.state, "backend", None)),
            "hash": weights_hash(full),
            "head_hash": weights_hash(read_full(acc, trainer.model, head)) if head else None,
            "local_numel": sum(_local(p).numel() for p in trainer.trainable.values()),
            "full_numel": sum(v.numel() for v in full.values()),
            "round_trip_error": write_read_round_trip(trainer),
            # the classes FSDP wrapped as units of their own (the whole model is one of them)
            "fsdp_units": sorted(
                {type(m).__name__ for m in trainer.model.modules() if hasattr(m, "reshard")}
            ),
            "test": {k: v for k, v in summary.get("test", {}).items() if isinstance(v, float)},
            "calibration": summary.get("calibration"),
            "summary_num_processes": summary.get("num_processes"),
        }
        with _real_open(os.path.join(out, f"{job['name']}.rank{RANK}.json"), "w") as fh:
            json.dump(result, fh)
    if RANK != 0:
        with _real_open(os.path.join(out, f"writes.rank{RANK}.json"), "w") as fh:
            json.dump(WRITES, fh)
    leave_process_group()
    if os.environ.get("LORAFIT_TEST_FSDP2") == "1":
        # Every result is on disk. FSDP2 on gloo is this worker's own arrangement, so its
        # process teardown is not lorafit's to test (the DDP tests cover `lorafit train`'s
        # exit): skip it, so that a gloo thread outliving the interpreter cannot fail a finished
        # launch.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
