"""Process groups of commands run under `torchrun`: joined for sharded work, and left cleanly.

Training's group is made by the data check or by the Trainer's accelerator; eval makes its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def init_distributed() -> None:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


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
