"""
Exact resume, crash-safe checkpoints, and a prepare script that loses nothing when killed.

A run interrupted after its checkpoint at iteration k and resumed with ``--resume`` must end with
the same weights, memory bank (contents, write pointers, fill counts), optimizer and scheduler
state as a run that was never interrupted. What makes it so (each is needed; the end-to-end test
fails without any one of them):
- the data stream continues where it stopped (``ResumableTrainingSampler``) and each sample's
  augmentation is seeded by its position (``SeededMapDataset``);
- the global generators are reseeded from (SEED, rank, iteration) before every step;
- the optimizer state is in the checkpoint (Detectron2 v0.6's DefaultTrainer left it out).
A checkpoint write that fails midway must leave the previous checkpoint and ``last_checkpoint``
intact.
"""
import itertools
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import region_contrast  # noqa: F401  (before Detectron2)
from detectron2.data.samplers import TrainingSampler
from region_contrast.engine.checkpoint import AtomicDetectionCheckpointer, atomic_write
from region_contrast.data import digit_scenes as ds
from region_contrast.engine.sampler import ResumableTrainingSampler, SeededMapDataset
from region_contrast.engine import Trainer, main
from conftest import (
    BASE_CONFIG,
    REPO,
    parse_args,
    single_thread,
    tiny_digit_scenes,
    tree_equal,
    unregister,
)

K = 3  # checkpoint period; the runs train 2K iterations


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# --------------------------------------------------------------------------------------------
# The data stream
# --------------------------------------------------------------------------------------------
def test_sampler_replays_detectron2_stream_from_any_start():
    size, seed, batch = 5, 11, 4
    d2 = list(itertools.islice(iter(TrainingSampler(size, seed=seed)), 40))
    ours = list(itertools.islice(ResumableTrainingSampler(size, seed=seed), 40))
    assert [i for _, i in ours] == d2  # same order as Detectron2's sampler, positions attached
    assert [p for p, _ in ours] == list(range(40))
    for start_iter in (1, 2, 3, 7):  # across epoch boundaries
        resumed = ResumableTrainingSampler(size, seed=seed, start=start_iter * batch)
        assert list(itertools.islice(resumed, 12)) == ours[start_iter * batch:][:12]


def test_sampler_shards_ranks_like_detectron2():
    size, seed, world = 7, 3, 3
    full = list(itertools.islice(ResumableTrainingSampler(size, seed=seed), 60))
    for start in (0, 6, 21):
        for rank in range(world):
            shard = ResumableTrainingSampler(
                size, seed=seed, start=start, rank=rank, world_size=world
            )
            assert list(itertools.islice(shard, 10)) == full[start + rank::world][:10]
    with pytest.raises(ValueError, match="multiple of the world size"):
        ResumableTrainingSampler(size, seed=seed, start=4, rank=0, world_size=3)


def test_detectron2_sampler_restarts_its_stream():
    # Why the project needs its own sampler: TrainingSampler has no start, so after --resume the
    # first batches of the run are seen again instead of the ones the interrupted run was at.
    stream = list(itertools.islice(iter(TrainingSampler(10, seed=0)), 30))
    again = list(itertools.islice(iter(TrainingSampler(10, seed=0)), 6))
    assert again == stream[:6] != stream[24:30]


def test_augmentation_depends_on_position_only():
    def mapper(d):  # draws from every global generator, like Detectron2's augmentations
        return (d, random.random(), float(np.random.rand()), float(torch.rand(())))

    dataset = SeededMapDataset(list(range(5)), mapper, seed=4)
    expected = [dataset[(p, p % 5)] for p in range(8)]
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    marker = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    # Other global states and another order give the same samples...
    assert [dataset[(p, p % 5)] for p in reversed(range(8))] == expected[::-1]
    # ...and loading does not move the caller's generators.
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == marker
    assert len({e[1] for e in expected}) == len(expected)  # positions draw different numbers
    random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2])


# --------------------------------------------------------------------------------------------
# Atomic checkpoints
# --------------------------------------------------------------------------------------------
def _failing_save(written):
    def save(obj, f, *args, **kwargs):
        f.write(b"\x00" * written)  # part of the file is on disk when the failure hits
        raise OSError(28, "No space left on device")
    return save


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    saved_weight = model.weight.detach().clone()
    checkpointer = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_final", iteration=1)
    good = (tmp_path / "model_final.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", _failing_save(100))
    for name in ("model_final", "model_0000009"):  # overwrite, and a new file
        with pytest.raises(OSError, match="No space left"):
            checkpointer.save(name, iteration=2)
        assert (tmp_path / "model_final.pth").read_bytes() == good
        assert not (tmp_path / "model_0000009.pth").exists()
        assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
        assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]
    monkeypatch.undo()

    # last_checkpoint itself is replaced atomically as well.
    def half_then_fail(f):
        f.write("model_00")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(tmp_path / "last_checkpoint"), half_then_fail, mode="w")
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]

    resumed = nn.Linear(3, 2)
    extra = AtomicDetectionCheckpointer(resumed, save_dir=str(tmp_path)).resume_or_load(
        "", resume=True
    )
    assert extra["iteration"] == 1
    assert torch.equal(resumed.weight, saved_weight)


# --------------------------------------------------------------------------------------------
# train_net.py: uninterrupted vs interrupted + --resume
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resume_scenes(tmp_path_factory):
    names = tiny_digit_scenes(str(tmp_path_factory.mktemp("resume_data")), "resume_scenes")
    yield names
    unregister(names)


def resume_opts(output_dir):
    return [
        "DATASETS.TRAIN", "('resume_scenes_train',)",
        "DATASETS.TEST", "('resume_scenes_val',)",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "11",
        "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32",
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "MODEL.REGION_CONTRAST.ENABLED", "True",
        "MODEL.REGION_CONTRAST.PROJ_DIM", "16",
        # Small rings wrap within the run, so pointers and fill counts are both exercised.
        "MODEL.REGION_CONTRAST.MEMORY_SIZE", "3",
        # Randomness inside the step: slot sampling, dynamic subsets, ASPP dropout (default 0.1).
        "MODEL.REGION_CONTRAST.SAMPLES_PER_CLASS", "2",
        "MODEL.REGION_CONTRAST.DYNAMIC_SAMPLES", "1",
        # Random resize (NumPy) then crop: the augmentation must replay too.
        "INPUT.MIN_SIZE_TRAIN", "(64, 80)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.CROP.SIZE", "(64, 64)",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(2 * K),
        "SOLVER.CHECKPOINT_PERIOD", str(K),
        "SOLVER.WARMUP_ITERS", "2",
        "DATALOADER.NUM_WORKERS", "0",
        "SEED", "7",
        "OUTPUT_DIR", str(output_dir),
    ]


def test_loader_resumes_exactly_with_any_number_of_workers(resume_scenes, tmp_path):
    from region_contrast.engine import get_region_contrast_cfg

    cfg = get_region_contrast_cfg()
    cfg.merge_from_file(BASE_CONFIG)
    cfg.merge_from_list(resume_opts(tmp_path))

    def batches(workers, start_iter, count):
        cfg.DATALOADER.NUM_WORKERS = workers
        loader = Trainer.build_train_loader(cfg)
        loader.set_start_iter(start_iter)
        it = iter(loader)
        out = [[(d["file_name"], d["image"], d["sem_seg"]) for d in next(it)] for _ in range(count)]
        with pytest.raises(RuntimeError, match="before the first batch"):
            loader.set_start_iter(0)
        return out

    expected = batches(0, 0, 5)
    assert len({name for batch in expected for name, _, _ in batch}) > 2
    assert cfg.DATALOADER.ASPECT_RATIO_GROUPING  # the order a worker split would disturb
    # Whichever process maps a sample, and at starts that are not multiples of the workers.
    for workers, start in ((0, 3), (2, 3), (3, 1)):
        got = batches(workers, start, 2)
        for batch, ref in zip(got, expected[start:]):
            for (name, image, label), (ref_name, ref_image, ref_label) in zip(batch, ref):
                assert name == ref_name
                assert torch.equal(image, ref_image) and torch.equal(label, ref_label)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_equals_uninterrupted_run(resume_scenes, tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"

    main(parse_args(*resume_opts(straight)))
    expected = load(straight / "model_final.pth")
    assert expected["iteration"] == 2 * K - 1

    # The interruption: the disk fills up while the second checkpoint (iteration 2K) is written,
    # after K more iterations were trained; they are lost, the first checkpoint is not.
    real_save, calls = torch.save, []

    def save_then_fail(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x00" * 4096)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        main(parse_args(*resume_opts(interrupted)))
    monkeypatch.undo()
    first = f"model_{K - 1:07d}.pth"
    assert (interrupted / "last_checkpoint").read_text() == first
    assert not (interrupted / "model_final.pth").exists()
    assert [n for n in os.listdir(interrupted) if n.endswith((".pth", ".tmp"))] == [first]
    assert load(interrupted / first)["iteration"] == K - 1

    main(parse_args("--resume", *resume_opts(interrupted)))
    got = load(interrupted / "model_final.pth")

    prefix = "sem_seg_head.region_contrast.memory_bank."
    bank = {k: v for k, v in expected["model"].items() if k.startswith(prefix)}
    assert set(bank) == {prefix + k for k in ("features", "ptr", "count")}
    assert int(bank["sem_seg_head.region_contrast.memory_bank.count"].sum()) > 0
    assert int(bank[prefix + "ptr"].sum()) > 0  # some rings have wrapped
    tree_equal(expected["model"], got["model"], "model")  # weights, BN statistics, bank
    tree_equal(expected["trainer"], got["trainer"], "trainer")  # optimizer, scheduler, iteration
    evaluation = os.path.join("inference", "resume_scenes_val", "sem_seg_evaluation.pth")
    np.testing.assert_equal(load(interrupted / evaluation), load(straight / evaluation))


def test_trainer_uses_the_atomic_checkpointer(resume_scenes, tmp_path):
    from region_contrast.engine import setup

    cfg = setup(parse_args(*resume_opts(tmp_path)))
    trainer = Trainer(cfg)
    assert isinstance(trainer.checkpointer, AtomicDetectionCheckpointer)
    hooks = [h for h in trainer.build_hooks() if hasattr(h, "checkpointer")]
    assert hooks and all(h.checkpointer is trainer.checkpointer for h in hooks)


# --------------------------------------------------------------------------------------------
# The prepare script, killed midway
# --------------------------------------------------------------------------------------------
def _pngs(folder):
    return sum(n.endswith(".png") for n in os.listdir(folder)) if os.path.isdir(folder) else 0


def _tree(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_prepare_script_killed_midway_then_rerun_is_complete(tmp_path):
    # tests/test_digit_scenes.py simulates an interruption by deleting files; here a real
    # process is killed with SIGKILL (no cleanup, no finally) while it writes scenes.
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    args = dict(num_train=150, num_val=30, num_test=10, size=48, seed=5)
    command = [
        sys.executable, os.path.join(REPO, "datasets", "prepare_digit_scenes.py"),
        "--num-train", "150", "--num-val", "30", "--num-test", "10", "--size", "48",
        "--seed", "5",
    ]
    env = {**os.environ, "DETECTRON2_DATASETS": str(killed)}
    images = killed / "digit_scenes" / "images" / "train"
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches any worker it forks
    )
    try:
        deadline = time.monotonic() + 180
        while _pngs(images) < 10:
            assert process.poll() is None, "the script finished before it could be killed"
            assert time.monotonic() < deadline, "the script wrote no scenes in time"
            time.sleep(0.002)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    dataset = killed / "digit_scenes"
    assert not (dataset / "manifest.json").exists() and (dataset / "generation.json").exists()
    assert _pngs(images) < 150

    ds.generate_digit_scenes(str(killed), progress=False, **args)  # what the script reruns
    ds.generate_digit_scenes(str(reference), progress=False, **args)
    got, expected = _tree(killed), _tree(reference)
    assert sorted(got) == sorted(expected)  # nothing missing, no leftover temporary file
    for name, data in expected.items():
        assert got[name] == data, name
