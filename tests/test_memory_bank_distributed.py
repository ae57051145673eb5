"""
RegionMemoryBank.push under torch.distributed: real processes, gloo on 127.0.0.1.

Every rank pushes a different, ragged number of rows (one rank none at all); afterwards every
rank's bank must be bitwise identical and equal to one bank fed all rows in rank order.
"""
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from region_contrast.memory_bank import RegionMemoryBank

NUM_CLASSES, SIZE, DIM, STEPS = 5, 4, 3, 4


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_for(rank, step):
    """Deterministic per (rank, step); rank 1 never has any rows."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = 0 if rank == 1 else int(torch.randint(0, 2 * SIZE + 3, (1,), generator=g)) + rank
    return torch.randn(n, DIM, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _worker(rank, world_size, port, out_dir, dtype):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
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
        torch.save(
            {"state": bank.state_dict(), "refused": refused}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def single_process_bank(world_size, dtype):
    bank = RegionMemoryBank(NUM_CLASSES, SIZE, DIM, dtype=dtype)
    for step in list(range(STEPS)) + [STEPS + 1]:
        parts = [rows_for(rank, step) for rank in range(world_size)]
        bank.push(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return bank


@pytest.mark.parametrize(
    "world_size, dtype", [(2, torch.float32), (3, torch.bfloat16), (3, torch.float16)]
)
def test_ranks_hold_identical_banks(tmp_path, world_size, dtype):
    mp.spawn(
        _worker, args=(world_size, free_port(), str(tmp_path), dtype), nprocs=world_size, join=True
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    assert all(r["refused"] for r in results)
    expected = single_process_bank(world_size, dtype).state_dict()
    assert int(expected["count"].sum()) > 0
    for result in results:
        state = result["state"]
        assert set(state) == set(expected)
        for name, value in expected.items():
            assert state[name].dtype == value.dtype
            assert torch.equal(state[name], value), name
