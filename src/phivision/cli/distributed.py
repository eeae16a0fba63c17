"""Process groups of commands run under `torchrun`: joined for sharded work, and left cleanly.

Training's group is made by the data check or by the Trainer's accelerator; eval makes its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def init_distributed() -> None:
    """Under `torchrun` with several processes, join the group as training does (same backend and timeout)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from phivision.train.config import TrainConfig
        from phivision.train.run import join_process_group

        join_process_group(TrainConfig.ddp_timeout)


def leave_process_group(wait_for_peers: bool) -> None:
    """Destroy the group, if one was joined, before the interpreter exits.

    Left to the interpreter's exit, gloo/NCCL threads are torn down in no set order and a rank can
    abort ("terminate called without an active exception") after its work is done. On success every
    rank meets at a barrier first, so none closes its connections while a peer still talks; after an
    error the rank may be failing alone, and a barrier would wait for peers that never come.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait_for_peers:
            dist.barrier()
    finally:
        dist.destroy_process_group()


@contextmanager
def process_group_left_on_exit() -> Iterator[None]:
    """Whatever the command does inside joins a group at will; it is left on every way out."""
    try:
        yield
    except BaseException:
        leave_process_group(wait_for_peers=False)
        raise
    leave_process_group(wait_for_peers=True)
