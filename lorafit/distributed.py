"""Building the Accelerator, with guards against silent distributed misconfiguration.

Known traps this module closes:
- on a machine without CUDA, a multi-process launch needs `cpu=True` (gloo); without it every
  rank quietly trains its own copy of the model;
- a launcher that started N processes while the Accelerator sees another number means the
  processes do not form one group: stop instead of training independent copies.
"""

from __future__ import annotations

import os

import torch

from lorafit.config import RunConfig
from lorafit.errors import TrainingError


def launcher_world_size() -> int:
    """Processes the launcher (torchrun / accelerate launch) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    world = launcher_world_size()
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
        "1",
        "true",
        "yes",
    )
    project = ProjectConfiguration(
        project_dir=cfg.output.dir, logging_dir=os.path.join(cfg.output.dir, "tb")
    )
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.output.report_to or None,
        project_config=project,
        # lorafit seeds and shards the training order itself; accelerate must not reseed RNGs.
        rng_types=[],
    )
    if accelerator.num_processes != world:
        raise TrainingError(
            f"the launcher started {world} processes but the Accelerator sees "
            f"{accelerator.num_processes}: they would train independent copies. On CPU use "
            "`torchrun --standalone --nproc_per_node N -m lorafit train ...` or `accelerate launch "
            "--multi_gpu --num_processes N ...` (see docs/distributed.md)"
        )
    return accelerator
