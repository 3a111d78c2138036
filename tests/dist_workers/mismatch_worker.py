"""Worker for tests/test_distributed.py: a launch that looks distributed but is not one group.

Under `torchrun --nproc_per_node 2` on a machine without CUDA, `Accelerator(cpu=False)` sees
one process per rank: every rank would train its own copy and nothing would fail. The guard
(`lorafit.distributed.check_world_size`, called by `make_accelerator`) must stop it.
"""

from __future__ import annotations

import sys

from accelerate import Accelerator

from lorafit.distributed import check_world_size
from lorafit.errors import TrainingError

accelerator = Accelerator(cpu=False)
try:
    check_world_size(accelerator)
except TrainingError as e:
    print(f"lorafit: error: {e} [num_processes={accelerator.num_processes}]", file=sys.stderr)
    sys.exit(3)
print(f"no error: num_processes={accelerator.num_processes}")
