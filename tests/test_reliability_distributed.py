"""
RegionContrastSegmentor under real torch.distributed: gloo on 127.0.0.1, processes spawned here.

Detectron2 v0.6's ``launch`` only starts NCCL/GPU processes, so the test starts its own; the
training step is the one ``DefaultTrainer`` runs (DistributedDataParallel with
``broadcast_buffers=False``, one optimizer step per batch), every rank with different data.
GroupNorm rather than BatchNorm in the backbone, and no norm in the head: BatchNorm's running
statistics are per-rank buffers (DDP does not broadcast them here), so only the weights, not the
whole state, would agree.

Checked, with 2 and 3 ranks (one spawn each):
- every rank ends with a bitwise-identical state (weights and memory bank), and the bank check
  train_net runs after training agrees, and fails on every rank once one rank's bank differs;
- a rank whose batch is all ignore (no region at all) at one step does not hang the others (the
  parent fails the test after a timeout instead of waiting forever);
- the ranks' bank equals a single-process reference that runs the same per-rank batches on one
  model, averages their gradients and pushes their rows in rank order (model-level counterpart
  of tests/test_memory_bank_distributed.py).
"""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

# conftest imports region_contrast
from conftest import build, free_port, make_batch, make_cfg, single_thread
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from region_contrast.engine.hooks import check_banks_agree

STEPS = 3
EMPTY_RANK, EMPTY_STEP = 1, 1
LR = 0.05
TIMEOUT_S = 300  # generous for a loaded 2-core machine; a healthy run takes ~20 s
SIZE = 32  # images and crop (the ASPP pooling kernel is 1x1 at stride 32)


def dist_cfg():
    # No dropout: the single-process reference must draw the same (no) random numbers.
    cfg = make_cfg(norm="GN", crop=SIZE, MEMORY_SIZE=7)
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT = 0.0
    # At this size res5 is 1x1, where the head's GroupNorm (one channel per group) normalises
    # single values: its output is rounding noise over sqrt(eps), and its bias drifts by 3e-4
    # when the loss is scaled by 1 + 2^-23, so it cannot be compared. The head runs without norm.
    cfg.MODEL.SEM_SEG_HEAD.NORM = ""
    return cfg


def batch_for(rank, step):
    """Different data on every rank; one rank has no labelled pixel at one step."""
    empty = (rank, step) == (EMPTY_RANK, EMPTY_STEP)
    return make_batch(seed=100 * step + rank, size=SIZE, all_ignore=empty)


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    try:
        # What detectron2.engine.launch sets up; comm.get_local_rank() etc. read it.
        comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))
        model = build(dist_cfg(), seed=10 + rank)  # different initial weights on every rank...
        ddp = DistributedDataParallel(model, broadcast_buffers=False)  # ...rank 0's broadcast
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        model.train()
        counts = []
        for step in range(STEPS):
            with EventStorage(step):
                losses = ddp(batch_for(rank, step))
            assert all(torch.isfinite(v) for v in losses.values()), losses
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            counts.append(model.memory_bank.count.clone())
        digest = check_banks_agree(model.memory_bank)
        # The check train_net runs after training fails on every rank when one bank differs.
        saved = model.memory_bank.features[0, 0, 0].item()
        if rank == world_size - 1:
            model.memory_bank.features[0, 0, 0] += 1.0
        with pytest.raises(RuntimeError, match=rf"rank\(s\) \[{world_size - 1}\] differs"):
            check_banks_agree(model.memory_bank)
        model.memory_bank.features[0, 0, 0] = saved
        assert check_banks_agree(model.memory_bank) == digest
        torch.save(
            {"state": model.state_dict(), "counts": counts},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def run_ranks(world_size, out_dir):
    context = mp.spawn(
        _worker, args=(world_size, free_port(), str(out_dir)), nprocs=world_size, join=False,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"{world_size} ranks did not finish within {TIMEOUT_S} s (hang?)")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


def reference(world_size):
    """One process, one model: per-rank forwards, averaged gradients, rows pushed in rank order."""
    model = build(dist_cfg(), seed=10)  # rank 0's initial weights
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    model.train()
    bank = model.memory_bank
    for step in range(STEPS):
        optimizer.zero_grad()
        pushed = []
        bank.push = lambda rows, classes, **_: pushed.append((rows, classes))
        try:
            for rank in range(world_size):
                with EventStorage(step):
                    losses = model(batch_for(rank, step))
                (sum(losses.values()) / world_size).backward()
        finally:
            del bank.push
        bank.push(torch.cat([p[0] for p in pushed]), torch.cat([p[1] for p in pushed]))
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_stay_identical_and_match_single_process(tmp_path, world_size):
    results = run_ranks(world_size, tmp_path)
    states = [r["state"] for r in results]
    for rank, state in enumerate(states[1:], start=1):
        assert state.keys() == states[0].keys()
        for key, value in states[0].items():
            assert torch.equal(value, state[key]), f"rank {rank} differs from rank 0 in {key}"

    bank_count = states[0]["sem_seg_head.region_contrast.memory_bank.count"]
    assert int(bank_count.sum()) > 0
    assert int(states[0]["sem_seg_head.region_contrast.memory_bank.ptr"].sum()) > 0
    # The empty rank added nothing at its empty step; the others did.
    grew = [int(c.sum()) for c in results[0]["counts"]]
    assert grew[0] > 0 and grew[EMPTY_STEP] > grew[EMPTY_STEP - 1]

    with single_thread():
        expected = reference(world_size)
    assert torch.equal(expected["sem_seg_head.region_contrast.memory_bank.count"], bank_count)
    assert torch.equal(expected["sem_seg_head.region_contrast.memory_bank.ptr"],
                       states[0]["sem_seg_head.region_contrast.memory_bank.ptr"])
    for key, value in expected.items():
        # Summation order differs (all-reduce, per-rank forwards): a few float32 roundings.
        torch.testing.assert_close(states[0][key], value, atol=1e-5, rtol=1e-4, msg=key)
