"""tools/benchmark.py --quick: runs end to end and writes a complete, consistent JSON report.

Also: no module of the benchmark package is over 400 lines.

Structure only: no timing is asserted (timings depend on the machine and its load).
"""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "benchmark.py")


def _stats_ok(stats):
    return (
        set(stats) >= {"min", "median", "max", "n"}
        and stats["n"] >= 1
        and 0 < stats["min"] <= stats["median"] <= stats["max"]
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b.json"
    proc = subprocess.run(
        [sys.executable, TOOL, "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_all_sections_present(report):
    r, stdout = report
    for key in ("machine", "load_average", "train_step", "inference", "contrast", "memory",
                "gpu", "targets", "table"):
        assert key in r, key
    m = r["machine"]
    for key in ("commit", "cpu_model", "cpu_cores", "torch_version", "device", "device_name"):
        assert m[key], key
    assert m["device"] == "cpu" and r["gpu"] is None
    load = r["load_average"]
    assert len(load["before"]) == 3 and len(load["after"]) == 3
    assert isinstance(load["loaded"], bool)
    assert r["quick"] is True
    assert "1. train step" in stdout and "3. contrast machinery" in stdout


RECIPES = {"DigitScenes", "DigitScenes Semantic FPN", "COCO panoptic Panoptic FPN", "Cityscapes"}


def test_train_step_and_inference(report):
    r, _ = report
    assert {t["recipe"] for t in r["train_step"]} == RECIPES
    for t in r["train_step"]:
        assert _stats_ok(t["rc_s"]) and _stats_ok(t["baseline_s"])
        assert t["ratio_median"] > 0 and t["ratio_of_medians"] > 0
        # A step past the warm-up against a pre-filled bank: the contrast loss is in play.
        assert t["contrast_loss_active"] is True
        assert t["bank"]["fill_fraction"] == 1.0
        mem = t["memory"]
        assert mem["bank_bytes"] > 0 and mem["persistent_extra_bytes"] >= mem["bank_bytes"]
        for key in ("rc_step_peak_bytes", "baseline_step_peak_bytes"):
            assert mem[key] is None or mem[key] > 0
    # Panoptic FPN's step: the R-CNN losses beside the semantic and contrastive ones, finite (a
    # diverged random model would leave the detection heads without work).
    panoptic = next(t for t in r["train_step"] if t["recipe"] == "COCO panoptic Panoptic FPN")
    losses = panoptic["rc_losses_last_step"]
    assert {"loss_rpn_cls", "loss_cls", "loss_mask", "loss_sem_seg", "loss_contrast"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert r["targets"]["panoptic_fpn_train_ratio"]["met"] is None
    assert {i["recipe"] for i in r["inference"]} == RECIPES
    for i in r["inference"]:
        assert _stats_ok(i["rc_s"]) and _stats_ok(i["baseline_s"])
        assert i["ratio_median"] > 0
        assert i["outputs_identical"] is True
        assert i["same_operators"] is True
        assert i["bank_untouched"] is True
        assert i["parameters_used_at_test"]["rc"] == i["parameters_used_at_test"]["baseline"]


def test_contrast_fast_matches_naive(report):
    r, _ = report
    cases = r["contrast"]["cases"]
    assert {c["num_classes"] for c in cases} == {19, 150, 171}
    assert any(c["samples_per_class"] == 0 for c in cases)  # the whole bank
    assert any(c["samples_per_class"] > 0 for c in cases)  # sampled per class
    for c in cases:
        assert _stats_ok(c["fast_s"]) and _stats_ok(c["naive_s"])
        assert c["speedup_median"] > 0
        assert c["regions"] > 0 and c["memory_rows_used"] > 0
        assert c["agree"] is True, c
        assert c["loss_allclose"] and c["same_regions"]
        assert c["percent_of_cityscapes_step_scaled"] > 0
    assert r["targets"]["contrast_fast_naive_agree"]["met"] is True
    assert r["targets"]["inference_outputs_identical"]["met"] is True
    # Checked where it is smooth: centres, loss and the anchors' gradient against float64.
    for c in cases:
        assert c["centers_rel_err_fast_vs_float64"] <= 1e-5
        assert c["anchor_grad_rel_err_fast_vs_float64"] <= 1e-3
    # The profiled forward split names ranges that occurred (a stale name raises instead).
    for t in r["train_step"]:
        b = t["profiled_breakdown"]
        assert b is not None and set(b["rc_only_ms"]) == {"criterion_forward", "bank_update"}
        assert all(v > 0 for v in b["rc_only_ms"].values())


def test_memory_table_covers_the_recipes(report):
    r, _ = report
    rows = [row for row in r["memory"] if "error" not in row]
    assert rows and not [row for row in r["memory"] if "error" in row]
    names = {row["recipe"] for row in rows}
    assert "configs/Base-DigitScenes.yaml" in names
    for row in rows:
        fp32 = row["num_classes"] * row["memory_size"] * row["dim"] * 4
        assert row["bank_bytes_fp32"] == fp32
        assert row["bank_bytes_fp16"] == row["bank_bytes_bf16"] == fp32 // 2
        assert row["pixel_memory_bytes_fp32"] == row["num_classes"] * 5000 * row["dim"] * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_fails_clearly(tmp_path):
    proc = subprocess.run(
        [sys.executable, TOOL, "--device", "cuda", "--quick", "--out", str(tmp_path / "c.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr
    assert not (tmp_path / "c.json").exists()


@pytest.fixture(scope="module")
def benchmark_tool():
    """The benchmark package's functions (tools/benchmarks), for direct calls."""
    import types

    from benchmarks import recipes, stats, train_step  # tools/ is on pytest's pythonpath

    return types.SimpleNamespace(
        digit_scenes_cfg=recipes.digit_scenes_cfg, digit_scenes_batch=recipes.digit_scenes_batch,
        bench_recipe_blocks=train_step.bench_recipe_blocks,
        resampled_interval=stats.resampled_interval, phase_extra_ms=stats.phase_extra_ms,
    )


def test_blocks_pool_every_blocks_pairs_and_keep_the_first_blocks_inference(benchmark_tool):
    cfg, source = benchmark_tool.digit_scenes_cfg()
    train, infer = benchmark_tool.bench_recipe_blocks(
        3, "DigitScenes", cfg, source, torch.device("cpu"), crop=(64, 64), batch_size=2,
        make_batch=benchmark_tool.digit_scenes_batch, amp=False, warmup=1, repeats=2,
        infer_repeats=1, seed=0,
    )
    assert len(train["blocks"]) == 3
    assert len(train["rc_times_s"]) == len(train["baseline_times_s"]) == 6
    pairs = [a / b for a, b in zip(train["rc_times_s"], train["baseline_times_s"])]
    assert train["ratio_median"] == pytest.approx(statistics.median(pairs))
    # The first block's full report rides along: memory, the breakdown, the inference check.
    assert train["memory"]["bank_bytes"] > 0 and train["contrast_loss_active"]
    assert infer["outputs_identical"] and infer["bank_untouched"]
    assert len(train["phases_s"]["rc"]) == 6 and len(train["phases_s"]["rc"][0]) == 3


def test_resampled_interval_brackets_the_pooled_median_and_narrows_with_data(benchmark_tool):
    import random

    rng = random.Random(1)
    # Blocks whose medians differ (the machine's state), each with noisy pairs around it.
    blocks = [[1.0 + shift + rng.gauss(0, 0.02) for _ in range(30)]
              for shift in (0.00, 0.03, 0.01, 0.04, 0.02, 0.03)]
    pooled = statistics.median([r for b in blocks for r in b])
    lo, hi = benchmark_tool.resampled_interval(blocks)
    assert lo <= pooled <= hi and hi - lo < 0.05
    assert benchmark_tool.resampled_interval(blocks) == [lo, hi]  # seeded: the same every run
    lo_few, hi_few = benchmark_tool.resampled_interval(blocks[:2])
    assert hi_few - lo_few > hi - lo
    assert benchmark_tool.resampled_interval([[1.02] * 5] * 3) == [1.02, 1.02]


def test_phase_extra_is_the_median_pairwise_difference(benchmark_tool):
    phases = {"rc": [(0.050, 0.080, 0.013), (0.052, 0.081, 0.014), (0.060, 0.079, 0.013)],
              "baseline": [(0.047, 0.079, 0.013), (0.049, 0.081, 0.013), (0.050, 0.080, 0.013)]}
    extra = benchmark_tool.phase_extra_ms(phases)
    assert extra["forward"] == pytest.approx(3.0)
    assert extra["backward"] == pytest.approx(0.0)
    assert extra["optimizer"] == pytest.approx(0.0)


def test_benchmark_modules_stay_small():
    folder = os.path.join(REPO, "tools", "benchmarks")
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                assert len(f.read().splitlines()) <= 400, name
