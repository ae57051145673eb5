"""
``train_net.py`` with several processes on the CPU, as a user types it: ``--num-gpus 2`` (one
machine) and the two-machine command (``--num-machines 2 --machine-rank 0|1 --dist-url``) run on
one machine. Detectron2 main's ``launch`` starts gloo processes without a GPU; v0.6's asserts
CUDA, so there these runs are skipped and train_net says what to do instead (tested).

Checked: training, evaluation across ranks and checkpointing on rank 0 work; every rank ends with
the same memory bank (the run's own all-gathered comparison, whose digest must be that of the
bank in rank 0's checkpoint); ``--resume`` with 2 processes from a mid-run checkpoint ends
bitwise where the uninterrupted run ended; one rank failing inside a step ends the run with its
error instead of leaving the other rank waiting in a collective.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    NO_SEVERAL_PROCESSES,
    REPO,
    SEVERAL_PROCESSES,
    digit_scenes_root,
    free_port,
    tree_equal,
)
from detectron2.data import DatasetCatalog
from region_contrast.engine.hooks import tensors_digest

RECIPE = os.path.join(REPO, "configs", "DigitScenes",
                      "semantic_R_18_FPN_region_contrast_noproj_digit_scenes_1500_bs8.yaml")
BANK = "sem_seg_head.region_contrast.memory_bank."
needs_cpu_launch = pytest.mark.skipif(not SEVERAL_PROCESSES, reason=NO_SEVERAL_PROCESSES)


def opts(output_dir, max_iter, *extra):
    return ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.IMS_PER_BATCH", "4",
            "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2",
            "MODEL.REGION_CONTRAST.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(output_dir), *extra]


def command(*args, config=RECIPE):
    return [sys.executable, "train_net.py", "--config-file", config, *args]


def environment(root):
    return {**os.environ, "DETECTRON2_DATASETS": root, "OMP_NUM_THREADS": "1"}


def run(args, root, timeout=300):
    return subprocess.run(args, cwd=REPO, env=environment(root), capture_output=True, text=True,
                          timeout=timeout)


def copypaste(text):
    """[(task, metric values)] from the "copypaste" lines Detectron2 logs after an evaluation,
    in order (a test-time augmented evaluation logs its results under the same task)."""
    return re.findall(r"copypaste: Task: (\S+)\n.*copypaste: \S+\n.*copypaste: (\S+)", text)


def bank_digest_logged(text):
    found = re.findall(r"memory bank is identical on all (\d+) ranks \(sha256 (\w+)\)", text)
    assert found, "no bank agreement line in the output"
    return found[-1]


def bank_digest_of(checkpoint):
    model = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    return tensors_digest([model[BANK + name] for name in ("features", "ptr", "count")])


@needs_cpu_launch
def test_two_processes_train_evaluate_and_resume_exactly(tiny_scenes, tmp_path):
    root = digit_scenes_root(tiny_scenes)
    train = command("--num-gpus", "2", *opts(tmp_path, 4, "DATASETS.TEST", "('digit_scenes_val',)"))
    first = run(train, root)
    assert first.returncode == 0, first.stderr[-4000:]
    output = first.stdout + first.stderr
    assert "copypaste: mIoU" in output  # evaluated across the two ranks, reported by rank 0
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert state["iteration"] == 3 and int(state["model"][BANK + "count"].sum()) > 0
    assert bank_digest_logged(output) == ("2", bank_digest_of(tmp_path / "model_final.pth"))

    # --resume from the checkpoint after iteration 2 of 4, with 2 processes again.
    os.replace(tmp_path / "model_final.pth", tmp_path / "uninterrupted.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    resumed = run(train[:2] + ["--resume"] + train[2:], root)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Loading from" in resumed.stdout + resumed.stderr
    uninterrupted = torch.load(tmp_path / "uninterrupted.pth", map_location="cpu",
                               weights_only=False)
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    tree_equal(final["model"], uninterrupted["model"], "model")
    # The trainer: iteration, scheduler, optimizer state (momentum).
    tree_equal(final["trainer"], uninterrupted["trainer"], "trainer")

    # --eval-only with 2 processes (each evaluates its share, rank 0 reports) and multi-scale +
    # flip: the plain metrics are the resumed training's final evaluation exactly.
    evaluated = run(command("--num-gpus", "2", "--eval-only",
                            *opts(tmp_path, 4, "DATASETS.TEST", "('digit_scenes_val',)",
                                  "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
                                  "TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(96, 128)")),
                    root)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    (plain, augmented) = copypaste(evaluated.stdout + evaluated.stderr)
    assert [plain] == copypaste(resumed.stdout + resumed.stderr)
    assert augmented[0] == "sem_seg" and augmented[1] != plain[1]


@needs_cpu_launch
def test_two_machine_command_on_one_machine(tiny_scenes, tmp_path):
    root, port = digit_scenes_root(tiny_scenes), free_port()
    processes = [
        subprocess.Popen(
            command("--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank),
                    "--dist-url", f"tcp://127.0.0.1:{port}",
                    *opts(tmp_path / f"machine{rank}", 2, "DATASETS.TEST", "()")),
            cwd=REPO, env=environment(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    # Rank 0 writes the checkpoint; rank 1 logs to its own machine's log.txt.rank1.
    assert not os.path.exists(tmp_path / "machine1" / "model_final.pth")
    expected = ("2", bank_digest_of(tmp_path / "machine0" / "model_final.pth"))
    assert bank_digest_logged(outputs[0]) == expected
    assert bank_digest_logged((tmp_path / "machine1" / "log.txt.rank1").read_text()) == expected


@needs_cpu_launch
def test_a_rank_failing_in_a_step_ends_the_run_instead_of_hanging(tiny_scenes, tmp_path):
    """One training label gets a value outside the classes: the rank that reads it stops (its
    mapper names the file) while the other is inside the step's collectives; the run must end
    with that error, not wait for Detectron2's 30-minute collective timeout."""
    source, root = digit_scenes_root(tiny_scenes), tmp_path / "data"
    shutil.copytree(source, root)
    train = DatasetCatalog.get(tiny_scenes[0])
    bad = root / os.path.relpath(train[len(train) // 2]["sem_seg_file_name"], source)
    label = np.array(Image.open(bad))
    label[:4, :4] = 200
    Image.fromarray(label).save(bad)

    start = time.monotonic()
    # 1 image per rank per step, 16 steps: one epoch, so exactly one rank meets the bad label.
    proc = run(command("--num-gpus", "2",
                       *opts(tmp_path / "out", 16, "SOLVER.IMS_PER_BATCH", "2",
                             "DATASETS.TEST", "()")), str(root), timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert f"Label file {bad} has values 200" in proc.stderr
    assert elapsed < 180, f"the run took {elapsed:.0f} s to end after one rank failed"


@pytest.mark.skipif(SEVERAL_PROCESSES,
                    reason="this Detectron2 starts CPU processes; the tests above run them")
def test_several_cpu_processes_on_v06_say_what_to_do(tmp_path):
    proc = subprocess.run(command("--num-gpus", "2", "OUTPUT_DIR", str(tmp_path)), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--num-gpus 2 --num-machines 1: 2 processes without a GPU" in proc.stderr
    assert "official Detectron2 main" in proc.stderr
