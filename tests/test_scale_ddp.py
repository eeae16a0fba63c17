"""Several processes at real-job shapes: mixed text/image micro-batches, token budgets, clean exits."""

from __future__ import annotations

import os
from functools import partial

import pytest
from helpers import run_on_two_processes

from phivision.errors import PhivisionError

# ---- leaving the process group -------------------------------------------------------------

EXIT_PATHS = {"success": None, "error": PhivisionError("bad data"), "interrupt": KeyboardInterrupt()}


def _leave_on_rank(rank: int, port: int, results, path: str) -> None:
    import torch.distributed as dist

    from phivision.cli.distributed import process_group_left_on_exit

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    raised = None
    try:
        with process_group_left_on_exit():
            dist.init_process_group("gloo")
            dist.barrier()
            if EXIT_PATHS[path] is not None:
                raise EXIT_PATHS[path]
    except (PhivisionError, KeyboardInterrupt) as error:
        raised = type(error).__name__
    results[rank] = (raised, dist.is_initialized())


@pytest.mark.slow
@pytest.mark.parametrize("path", EXIT_PATHS)
def test_a_command_leaves_its_process_group_on_every_way_out(path):
    """A group left to the interpreter's exit aborted a rank now and then ("terminate called...")."""
    raised = {"success": None, "error": "PhivisionError", "interrupt": "KeyboardInterrupt"}[path]
    results = run_on_two_processes(partial(_leave_on_rank, path=path))
    assert results == {0: (raised, False), 1: (raised, False)}
