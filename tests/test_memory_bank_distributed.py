"""
RegionMemoryBank.push under torch.distributed: real processes, gloo on 127.0.0.1.

Every rank pushes a different, ragged number of rows (one rank none at all); afterwards every
rank's bank must be bitwise identical and equal to one bank fed all rows in rank order.

The spawned workers load ``memory_bank.py`` straight from the package directory rather than
importing ``region_contrast``: the package's ``__init__`` imports Detectron2 (data set
registration), which costs each process several seconds on a small machine, while the memory
bank itself is pure torch. It is the same source file the parent imports normally.
"""
import importlib.util
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NUM_CLASSES, SIZE, DIM, STEPS = 5, 4, 3, 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_memory_bank_module():
    package = importlib.util.find_spec("region_contrast")  # locates, does not run __init__
    path = os.path.join(package.submodule_search_locations[0], "modeling", "memory_bank.py")
    spec = importlib.util.spec_from_file_location("_region_contrast_memory_bank", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_for(rank, step):
    """Deterministic per (rank, step); rank 1 never has any rows."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = 0 if rank == 1 else int(torch.randint(0, 2 * SIZE + 3, (1,), generator=g)) + rank
    return torch.randn(n, DIM, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _worker(rank, world_size, port, out_dir):
    RegionMemoryBank = load_memory_bank_module().RegionMemoryBank
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        results = {}
        for dtype in DTYPES:
            bank = RegionMemoryBank(NUM_CLASSES, SIZE, DIM, dtype=dtype)
            for step in range(STEPS):
                bank.push(*rows_for(rank, step))
            # One rank sends a NaN row: every rank must refuse the whole push, none may hang.
            bad, bad_classes = rows_for(rank, STEPS)
            if rank == 0:
                bad = torch.cat([bad, torch.full((1, DIM), float("nan"))])
                bad_classes = torch.cat([bad_classes, torch.zeros(1, dtype=torch.long)])
            refused = False
            try:
                bank.push(bad, bad_classes)
            except ValueError:
                refused = True
            bank.push(*rows_for(rank, STEPS + 1))  # still in step after the refusal
            results[str(dtype)] = {"state": bank.state_dict(), "refused": refused}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def single_process_bank(world_size, dtype):
    from region_contrast.memory_bank import RegionMemoryBank

    bank = RegionMemoryBank(NUM_CLASSES, SIZE, DIM, dtype=dtype)
    for step in list(range(STEPS)) + [STEPS + 1]:
        parts = [rows_for(rank, step) for rank in range(world_size)]
        bank.push(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return bank


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_hold_identical_banks(tmp_path, world_size):
    mp.spawn(_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for dtype in DTYPES:
        expected = single_process_bank(world_size, dtype).state_dict()
        assert int(expected["count"].sum()) > 0
        for rank_results in results:
            result = rank_results[str(dtype)]
            assert result["refused"]
            assert set(result["state"]) == set(expected)
            for name, value in expected.items():
                got = result["state"][name]
                assert got.dtype == value.dtype
                assert torch.equal(got, value), f"{dtype} {name}"
