"""Building the Accelerator, with guards against silent distributed misconfiguration.

Known traps this module closes:
- on a machine without CUDA, a multi-process launch needs `cpu=True` (gloo); without it every
  rank quietly trains its own copy of the model;
- a launcher that started N processes while the Accelerator sees another number means the
  processes do not form one group: stop instead of training independent copies;
- `WORLD_SIZE` set by hand (no launcher) would make the process group wait forever for peers:
  stop before creating it;
- `device_map="auto"` spreads one model over every GPU: under DDP each rank must hold its own
  copy on its own device (`{"": local_process_index}`), see `quantized_device_map`;
- under DeepSpeed ZeRO-3 and FSDP the parameters are shards: reading or writing the trainable
  weights (checkpoints, best-weight snapshots, the saved adapter) goes through `read_full` /
  `write_full`, which gather them first, so adapters saved from rank 0 are complete.

Only the main process logs, writes files and shows progress; `make_accelerator` quiets the
libraries' progress bars and warnings on the other ranks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any

import torch

from lorafit.config import RunConfig
from lorafit.errors import ConfigError, TrainingError

# Variables every launcher (torchrun, accelerate launch, deepspeed, mpirun via accelerate) sets
# next to WORLD_SIZE; without them the process group cannot form.
_LAUNCHER_VARS = ("RANK", "MASTER_ADDR", "MASTER_PORT")
# Prefixes wrappers add to parameter names (FSDP1 auto-wrap, activation checkpointing, compile).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def launcher_world_size() -> int:
    """Processes the launcher (torchrun / accelerate launch) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


def launcher_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on the process that writes files and prints (usable before an Accelerator exists)."""
    return launcher_rank() == 0


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def check_launch_env() -> None:
    """Refuse a WORLD_SIZE > 1 that no launcher set (it would hang waiting for peers)."""
    world = launcher_world_size()
    if world <= 1:
        return
    missing = [v for v in _LAUNCHER_VARS if v not in os.environ]
    if missing:
        raise TrainingError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} are not: this process was not "
            "started by a launcher and would wait forever for its peers. Unset WORLD_SIZE, or "
            "start with `accelerate launch` / `torchrun` (see docs/distributed.md)"
        )


def check_world_size(accelerator, world: int | None = None) -> None:
    """Stop unless the Accelerator's process group has as many processes as the launcher started."""
    world = launcher_world_size() if world is None else world
    if accelerator.num_processes != world:
        raise TrainingError(
            f"the launcher started {world} processes but the Accelerator sees "
            f"{accelerator.num_processes}: they would train independent copies. On CPU use "
            "`torchrun --standalone --nproc_per_node N -m lorafit train ...` or `accelerate launch "
            "--multi_gpu --num_processes N ...` (see docs/distributed.md)"
        )


def use_cpu() -> bool:
    """CPU (gloo) when CUDA is absent or ACCELERATE_USE_CPU asks for it."""
    return not torch.cuda.is_available() or _env_true("ACCELERATE_USE_CPU")


def dataloader_config():
    """Each rank reads its own share of every loader, iterable ones included.

    accelerate's default for an IterableDataset is to dispatch: rank 0 reads whole batches for
    everyone and concatenates them, which fails on dynamically padded batches of different
    lengths. Without dispatching, each rank reads the stream and keeps its slice.
    """
    from accelerate.utils import DataLoaderConfiguration

    return DataLoaderConfiguration(dispatch_batches=False)


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_launch_env()
    world = launcher_world_size()
    project = ProjectConfiguration(
        project_dir=cfg.output.dir, logging_dir=os.path.join(cfg.output.dir, "tb")
    )
    accelerator = Accelerator(
        # Without CUDA a multi-process launch must use gloo; accelerate only picks it with cpu=True.
        cpu=use_cpu(),
        mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.output.report_to or None,
        project_config=project,
        dataloader_config=dataloader_config(),
        # lorafit seeds and shards the training order itself; accelerate must not reseed RNGs.
        rng_types=[],
    )
    check_world_size(accelerator, world)
    share_cpu_threads(accelerator)
    if not accelerator.is_main_process:
        quiet_libraries()
    if is_sharded(accelerator) and cfg.train.ema_decay:
        raise ConfigError(
            "train.ema_decay is not supported under DeepSpeed ZeRO-3 or FSDP (the EMA would need "
            "a full gather every step); unset it or use DDP / ZeRO-2"
        )
    if is_deepspeed(accelerator):
        _configure_deepspeed(accelerator, cfg)
    return accelerator


def backend_note(accelerator) -> str | None:
    """A line when the launch asked for FSDP, DeepSpeed or N processes and got something else.

    accelerate selects FSDP and DeepSpeed only on accelerators (GPUs, ...): on CPU an FSDP
    template silently becomes DDP, every rank holding the whole model.
    """
    for env, wanted, running in (
        ("ACCELERATE_USE_FSDP", "FSDP", is_fsdp(accelerator)),
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", is_deepspeed(accelerator)),
    ):
        if _env_true(env) and not running:
            kind = str(accelerator.distributed_type).split(".")[-1]
            return (
                f"backend: the launcher asked for {wanted} ({env}) but accelerate runs {kind} on "
                f"{accelerator.device.type}: the model is not sharded, every rank holds all of it "
                "(accelerate shards on GPUs only; docs/distributed.md)"
            )
    # accelerate's one-process launcher sets MASTER_ADDR only for --num_processes > 1
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ and "MASTER_ADDR" in os.environ
    if launched and "WORLD_SIZE" not in os.environ and accelerator.num_processes == 1:
        return (
            "backend: accelerate launch started 1 process, not the --num_processes asked for "
            "(its --cpu launcher starts one); on CPU launch with `accelerate launch --multi_gpu "
            "--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no` or "
            "torchrun (docs/distributed.md)"
        )
    return None


def share_cpu_threads(accelerator) -> None:
    """Several CPU processes on one machine: split the cores instead of oversubscribing them.

    Two ranks with two OpenMP threads each on two cores spin against each other and run about
    ten times slower than one thread each (measured here). An explicit OMP_NUM_THREADS wins.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    if accelerator.device.type != "cpu" or local_world <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def quiet_libraries() -> None:
    """Non-main ranks: no progress bars, no warnings from lorafit (rank 0 prints the data
    warnings), datasets, transformers or peft."""
    logging.getLogger("lorafit").setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        # transformers' GGUF loader draws a tqdm bar of its own, outside that switch
        from transformers import modeling_gguf_pytorch_utils as gguf_loading

        gguf_loading.tqdm = functools.partial(gguf_loading.tqdm, disable=True)


# ----------------------------------------------------------------------------- device placement
def quantized_device_map(accelerator=None) -> dict[str, Any]:
    """Where a 4-bit (QLoRA) model is loaded: the whole model on this rank's own device.

    bitsandbytes quantises while loading onto a device, so the device must be chosen at load
    time. Under DDP rank r uses `{"": r_local}` (cuda:r_local); never "auto", which spreads one
    model over every GPU and leaves the other ranks nothing to do.
    """
    if torch.cuda.is_available() and not _env_true("ACCELERATE_USE_CPU"):
        index = (
            accelerator.local_process_index if accelerator is not None else launcher_local_rank()
        )
        return {"": index}
    return {"": "cpu"}


def check_device_map(device_map: Any) -> None:
    """Refuse device maps that spread one model over several devices under a multi-process launch."""
    if launcher_world_size() > 1 and isinstance(device_map, str):
        raise ConfigError(
            f'device_map="{device_map}" under a {launcher_world_size()}-process launch spreads one '
            "model over every GPU and turns DDP into a single process; each rank must load its "
            'own copy on its own device: device_map={"": accelerator.local_process_index}'
        )


# -------------------------------------------------------------------------- sharded parameters
def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage or 0)


def is_sharded(accelerator) -> bool:
    """Parameters are shards (ZeRO-3 or FSDP): reading/writing them needs a gather."""
    return zero_stage(accelerator) == 3 or is_fsdp(accelerator)


def clean_name(name: str) -> str:
    """A parameter name without the prefixes that distributed wrappers insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _configure_deepspeed(accelerator, cfg: RunConfig) -> None:
    """Fill DeepSpeed's batch/clipping fields from the lorafit config (never left to 'auto').

    lorafit accumulates gradients itself (the loss is divided by train.grad_accum and the
    trainer marks the last micro-batch as the boundary), so DeepSpeed's own accumulation is 1.
    """
    conf = accelerator.state.deepspeed_plugin.deepspeed_config
    tc = cfg.train
    conf["train_micro_batch_size_per_gpu"] = tc.batch_size
    conf["gradient_accumulation_steps"] = 1
    conf["train_batch_size"] = tc.batch_size * accelerator.num_processes
    if conf.get("gradient_clipping", "auto") == "auto":
        conf["gradient_clipping"] = float(tc.max_grad_norm or 0.0)


@contextlib.contextmanager
def _fsdp1_full_params(accelerator, model, writeback: bool):
    """FSDP1 (FullyShardedDataParallel wrapper): summon the full parameters of the whole model."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        with FSDP.summon_full_params(model, writeback=writeback):
            yield
    else:
        yield


def _fsdp2_sharded_params(
    model, params: dict[str, torch.nn.Parameter]
) -> dict[str, torch.nn.Parameter]:
    """FSDP2: the sharded parameters (DTensors) of `params`' names, after resharding the model.

    After a forward without backward (evaluation, the contrastive head fit) FSDP2 can leave a
    module unsharded: its registered parameters are then plain full tensors, and writes into
    them are lost at the next reshard. Resharding first makes every rank see, read and write the
    same DTensor shards, which the next forward gathers afresh.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        return params
    for module in modules:
        module.reshard()
    registered = {clean_name(n): p for n, p in model.named_parameters()}
    return {k: registered[k] for k in params}


def read_full(accelerator, model, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of `params`, complete on every rank even when they are ZeRO-3/FSDP shards.

    A collective under ZeRO-3 / FSDP: every rank must call it, in the same order.
    """
    if not is_sharded(accelerator):
        return {k: p.detach().to("cpu", copy=True) for k, p in params.items()}
    out: dict[str, torch.Tensor] = {}
    if is_deepspeed(accelerator):
        import deepspeed

        for k, p in params.items():  # one at a time: never the whole model on one device
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[k] = p.detach().to("cpu", copy=True)
        return out
    params = _fsdp2_sharded_params(model, params)
    with _fsdp1_full_params(accelerator, model, writeback=False):
        for k, p in params.items():
            value = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2: DTensor
            out[k] = value.detach().to("cpu", copy=True)
    return out


@torch.no_grad()
def write_full(
    accelerator, model, params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]
) -> None:
    """Copy complete `values` into `params` (shards under ZeRO-3/FSDP). Collective when sharded."""
    if not is_sharded(accelerator):
        for k, p in params.items():
            p.copy_(values[k].to(p.device, p.dtype))
        return
    if is_deepspeed(accelerator):
        import deepspeed

        for k, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if accelerator.is_main_process:
                    p.copy_(values[k].to(p.device, p.dtype))
        return
    params = _fsdp2_sharded_params(model, params)
    with _fsdp1_full_params(accelerator, model, writeback=True):
        for k, p in params.items():
            if hasattr(p, "full_tensor"):  # FSDP2: write this rank's shard of the full value
                from torch.distributed.tensor import distribute_tensor

                full = values[k].to(p.device, p.dtype)
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(values[k].to(p.device, p.dtype))


def leave_process_group() -> None:
    """Destroy the process group once a command's work is done. Left to the interpreter's exit,
    Gloo's worker threads can outlive it and abort the process ("terminate called without an
    active exception", SIGABRT), failing a launch whose work had finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gather_per_rank(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (the object itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
