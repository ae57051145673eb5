#!/usr/bin/env python
"""
Trains the DigitScenes variants over several seeds and writes what they reach.

    python tools/run_experiments.py                    # 4 variants x 3 seeds, the demo schedule
    python tools/run_experiments.py --seeds 0 1 --variants baseline region
    python tools/run_experiments.py --quick            # seconds: tiny schedule, for the tests

Variants (each the DigitScenes recipe of the demo, differing only in the keys shown):
  baseline  MODEL.REGION_CONTRAST.ENABLED False (the plain DeepLabV3+ recipe)
  region    region anchors (the paper)
  pixel     pixel anchors (ANCHORS "pixel")
  dynamic   region anchors plus dynamic sampling (DYNAMIC_SAMPLES 2)

Each run is ``train_net.py``'s own ``main`` with ``SEED`` and ``OUTPUT_DIR`` set, run in this
process one after the other; its final evaluation is read back from the evaluator's
``sem_seg_evaluation.pth``, so a run already complete is not trained again (re-running after an
interruption finishes the missing ones). Writes ``<out>.md`` (mIoU mean +/- std per variant,
per-class IoU, wall time of every run, the commit and the machine) and ``<out>.png`` (bars with
error bars), by default ``results/digit_scenes.{md,png}``.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

from region_contrast.files import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "DigitScenes")
BASELINE = "deeplab_v3_plus_R_18_os32_digit_scenes_1500_bs8.yaml"
REGION_CONTRAST = "deeplab_v3_plus_R_18_os32_region_contrast_digit_scenes_1500_bs8.yaml"

# name -> (recipe, overrides); every variant but the baseline is the demo's recipe.
VARIANTS = {
    "baseline": (BASELINE, []),
    "region": (REGION_CONTRAST, []),
    "pixel": (REGION_CONTRAST, ["MODEL.REGION_CONTRAST.ANCHORS", "pixel"]),
    "dynamic": (REGION_CONTRAST, ["MODEL.REGION_CONTRAST.DYNAMIC_SAMPLES", "2"]),
}
# A schedule that exercises every code path in seconds (the numbers mean nothing).
QUICK_OPTS = [
    "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "2",
    "MODEL.REGION_CONTRAST.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0",
]


def load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_dir(root, variant, seed):
    return os.path.join(root, f"{variant}_seed{seed}")


def run_argv(variant, seed, output_dir, extra_opts):
    """``train_net.py``'s arguments for one run."""
    recipe, overrides = VARIANTS[variant]
    return [
        "--config-file", os.path.join(CONFIG_DIR, recipe),
        *overrides, "SEED", str(seed), "OUTPUT_DIR", output_dir, *extra_opts,
    ]


def read_result(output_dir, argv):
    """
    The record of a finished run with these arguments, or None: never run, interrupted, or run
    with other arguments (say, ``--quick`` into the same folder), which is then trained again.
    """
    done = os.path.join(output_dir, "run.json")
    if not os.path.isfile(done):
        return None
    with open(done) as f:
        record = json.load(f)
    if record.get("argv") != argv:
        print(f"{done} was written by another command ({' '.join(record.get('argv', []))}); "
              "training again.", flush=True)
        return None
    return record


def train_one(train_net, variant, seed, argv):
    """Trains and evaluates one run through ``train_net.main``; returns its record."""
    from detectron2.engine import default_argument_parser

    output_dir = argv[argv.index("OUTPUT_DIR") + 1]
    args = default_argument_parser().parse_args(argv)
    start = time.perf_counter()
    results = train_net.main(args)
    wall = time.perf_counter() - start
    if not results or "sem_seg" not in results:
        raise RuntimeError(
            f"Run {variant} seed {seed} ({output_dir}) finished without a sem_seg evaluation; "
            "expected DATASETS.TEST to name a DigitScenes split."
        )
    record = {
        "variant": variant,
        "seed": seed,
        "commit": commit_description(),
        "wall_s": wall,
        "argv": argv,
        "sem_seg": {k: float(v) for k, v in results["sem_seg"].items()},
    }
    # Written last: its presence means the run is complete.
    atomic_write(os.path.join(output_dir, "run.json"), lambda f: json.dump(record, f, indent=1),
                 mode="w")
    return record


def _benchmark_machine():
    # The benchmark package sits beside this script; its machine readers serve both.
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from benchmarks import machine

    return machine


def commit_description():
    return _benchmark_machine().commit_description()


def machine_description():
    cpu_model = _benchmark_machine().cpu_model

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (
        f"{cpu_model()}, {cores} cores, {device}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def summarise(records, class_names):
    """{variant: {"miou": (mean, std, n), "per_class": {name: (mean, std)}, "wall": [...]}}."""
    out = {}
    for variant in VARIANTS:
        runs = [r for r in records if r["variant"] == variant]
        if not runs:
            continue
        miou = np.array([r["sem_seg"]["mIoU"] for r in runs])
        per_class = {}
        for name in class_names:
            values = np.array([r["sem_seg"].get(f"IoU-{name}", np.nan) for r in runs])
            per_class[name] = (float(np.nanmean(values)), float(np.nanstd(values)))
        out[variant] = {
            "miou": (float(miou.mean()), float(miou.std()), len(runs)),
            "per_class": per_class,
            "runs": sorted(runs, key=lambda r: r["seed"]),
        }
    return out


def write_markdown(path, summary, class_names, header):
    lines = ["# DigitScenes: RegionContrast variants against the baseline", ""]
    lines += header + [""]
    lines += ["| variant | mIoU mean +/- std | runs | mIoU per seed | wall time per run (s) |",
              "|---|---|---|---|---|"]
    for variant, s in summary.items():
        mean, std, n = s["miou"]
        seeds = ", ".join(f"{r['seed']}: {r['sem_seg']['mIoU']:.1f}" for r in s["runs"])
        walls = ", ".join(f"{r['wall_s']:.0f}" for r in s["runs"])
        lines.append(f"| {variant} | {mean:.1f} +/- {std:.1f} | {n} | {seeds} | {walls} |")
    lines += ["", "Per-class IoU (mean +/- std over seeds):", ""]
    lines.append("| class | " + " | ".join(summary) + " |")
    lines.append("|---|" + "---|" * len(summary))
    for name in class_names:
        cells = [f"{s['per_class'][name][0]:.1f} +/- {s['per_class'][name][1]:.1f}"
                 for s in summary.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    atomic_write(path, lambda f: f.write("\n".join(lines)), mode="w")


def write_plot(path, summary, title):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(summary)
    means = [summary[v]["miou"][0] for v in names]
    stds = [summary[v]["miou"][1] for v in names]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    bars = ax.bar(names, means, yerr=stds, capsize=6, color=["#888888"] + ["#1f77b4"] * 3)
    for bar, runs in zip(bars, (summary[v]["runs"] for v in names)):
        xs = np.full(len(runs), bar.get_x() + bar.get_width() / 2)
        ax.scatter(xs, [r["sem_seg"]["mIoU"] for r in runs], color="black", s=12, zorder=3)
    ax.set_ylabel("mIoU on digit_scenes_val")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(max(means) + max(stds) + 5, 10))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir", default=os.path.join("output", "experiments"),
                        help="one folder per run (checkpoints, logs, evaluation)")
    parser.add_argument("--results", default=os.path.join("results", "digit_scenes"),
                        help="path of the table and plot, without extension")
    parser.add_argument("--quick", action="store_true",
                        help="4 iterations per run: checks the tool, the numbers mean nothing")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for every run (KEY VALUE ...), last")
    args = parser.parse_args(argv)

    import region_contrast  # noqa: F401  (registers the data sets)
    from detectron2.data import MetadataCatalog

    train_net = load_train_net()
    extra = (QUICK_OPTS if args.quick else []) + list(args.opts)
    records = []
    todo = [(v, s) for v in args.variants for s in args.seeds]
    for i, (variant, seed) in enumerate(todo, 1):
        out = run_dir(args.output_dir, variant, seed)
        argv_run = run_argv(variant, seed, out, extra)
        record = read_result(out, argv_run)
        if record is None:
            print(f"[{i}/{len(todo)}] training {variant}, seed {seed} -> {out}", flush=True)
            os.makedirs(out, exist_ok=True)
            record = train_one(train_net, variant, seed, argv_run)
        else:
            print(f"[{i}/{len(todo)}] {variant}, seed {seed}: already done ({out})", flush=True)
        print(f"[{i}/{len(todo)}] {variant}, seed {seed}: mIoU {record['sem_seg']['mIoU']:.2f} "
              f"in {record['wall_s']:.0f} s", flush=True)
        records.append(record)

    test_set = "digit_scenes_val"
    for i, token in enumerate(extra[:-1]):
        if token == "DATASETS.TEST":
            test_set = extra[i + 1].strip("()[]',\" ")
    class_names = MetadataCatalog.get(test_set).stuff_classes
    summary = summarise(records, class_names)
    schedule = "quick (4 iterations)" if args.quick else "the demo schedule"
    header = [
        f"Written by `python tools/run_experiments.py` on "
        f"{datetime.date.today().isoformat()}: {len(args.seeds)} seed(s) per variant, "
        f"{schedule}, evaluated on `{test_set}` with Detectron2's `SemSegEvaluator`.",
        "",
        "- Commit of the runs: " + ", ".join(sorted({r.get("commit", "unknown") for r in records})),
        f"- Machine: {machine_description()}",
        f"- Overrides for every run: {' '.join(extra) or 'none'}",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    write_markdown(args.results + ".md", summary, class_names, header)
    write_plot(args.results + ".png", summary,
               f"DigitScenes, {len(args.seeds)} seed(s) each, {schedule}")
    print(f"wrote {args.results}.md and {args.results}.png")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
