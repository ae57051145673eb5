#!/usr/bin/env python
"""
The DigitScenes study: where does region contrast help, and by how much? (``make results``)

    python tools/run_experiments.py                       # screen, then confirmation
    python tools/run_experiments.py --stage screen        # only the screen
    python tools/run_experiments.py --stage screen --settings baseline region weight_0.5
    python tools/run_experiments.py --quick ...           # seconds per run, for the tests

Stages:
  screen        every setting of SETTINGS, seed 0, evaluated on ``digit_scenes_val``;
  confirmation  the one or two RegionContrast settings of the screen that gain most over the
                baseline of their regime on val (never chosen by a test score), and that
                baseline, seeds 0, 1, 2, evaluated on ``digit_scenes_test``. A seed the screen
                already trained is not trained again: its checkpoint is evaluated on test.

Each run is ``train_net.py``'s ``main`` (:func:`region_contrast.engine.main`) in this process,
followed by diagnostics on the evaluated split (:mod:`region_contrast.evaluation.diagnostics`:
digit pixels predicted as another digit or as background, nearest-class-mean accuracy and
between/within scatter of the region centres the classifier reads). Its record (metrics,
per-class IoU, diagnostics, seed, commit, machine, wall time) is written to
``<records>/<stage>/<setting>_seed<k>.json``, by default under ``results/digit_scenes_study/``,
which is committed: a study interrupted in one session continues
in the next, and a finished run is never trained again. Checkpoints go to ``--output-dir``.
Writes ``<results>.md`` (tables) and ``<results>.png`` (mIoU per setting, seeds as dots).
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from region_contrast.files import atomic_write
from region_contrast.provenance import commit_description, cpu_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "DigitScenes")
BASELINE = "deeplab_v3_plus_R_18_os32_digit_scenes_1500_bs8.yaml"
REGION_CONTRAST = "deeplab_v3_plus_R_18_os32_region_contrast_digit_scenes_1500_bs8.yaml"
FPN_BASELINE = "semantic_R_18_FPN_digit_scenes_1500_bs8.yaml"
FPN_REGION_CONTRAST = "semantic_R_18_FPN_region_contrast_noproj_digit_scenes_1500_bs8.yaml"
RC = "MODEL.REGION_CONTRAST."
FEW_SCENES = 250  # training scenes of the "few" regime
LONG_ITERS = "4500"  # the "long" regime: three times the demo schedule

# name -> (regime, recipe, overrides). The demo regime is the demo's schedule and data; "long"
# trains three times as long; "few" trains on the first FEW_SCENES training scenes.
SETTINGS = {
    "baseline": ("demo", BASELINE, []),
    "region": ("demo", REGION_CONTRAST, []),
    "weight_0.5": ("demo", REGION_CONTRAST, [RC + "LOSS_WEIGHT", "0.5"]),
    "weight_1.0": ("demo", REGION_CONTRAST, [RC + "LOSS_WEIGHT", "1.0"]),
    "temperature_0.2": ("demo", REGION_CONTRAST, [RC + "TEMPERATURE", "0.2"]),
    "no_projection": ("demo", REGION_CONTRAST, [RC + "PROJ_DIM", "0"]),
    "bank_200": ("demo", REGION_CONTRAST, [RC + "MEMORY_SIZE", "200"]),
    "bank_3000": ("demo", REGION_CONTRAST, [RC + "MEMORY_SIZE", "3000"]),
    "pixel_anchors": ("demo", REGION_CONTRAST, [RC + "ANCHORS", "pixel"]),
    "baseline_long": ("long", BASELINE, ["SOLVER.MAX_ITER", LONG_ITERS]),
    "region_long": ("long", REGION_CONTRAST, ["SOLVER.MAX_ITER", LONG_ITERS]),
    "baseline_few": ("few", BASELINE, []),
    "region_few": ("few", REGION_CONTRAST, []),
    # The one setting that beat its baseline in the first screen (no projection head), in the
    # other two regimes: added after it (ADDED_AFTER_FIRST_SCREEN).
    "no_projection_long": ("long", REGION_CONTRAST,
                           [RC + "PROJ_DIM", "0", "SOLVER.MAX_ITER", LONG_ITERS]),
    "no_projection_few": ("few", REGION_CONTRAST, [RC + "PROJ_DIM", "0"]),
    # A second head: Semantic FPN (Detectron2's SemanticSegmentor and SemSegFPNHead), the demo's
    # data and schedule; region contrast without and with the paper's (64-d) projection head.
    "baseline_fpn": ("fpn", FPN_BASELINE, []),
    "fpn_no_projection": ("fpn", FPN_REGION_CONTRAST, []),
    "fpn_projection_64": ("fpn", FPN_REGION_CONTRAST, [RC + "PROJ_DIM", "64"]),
}
ADDED_AFTER_FIRST_SCREEN = ("no_projection_long", "no_projection_few", "baseline_fpn",
                            "fpn_no_projection", "fpn_projection_64")
BASELINE_OF_REGIME = {"demo": "baseline", "long": "baseline_long", "few": "baseline_few",
                      "fpn": "baseline_fpn"}
# The model of each regime, and how many of its RegionContrast settings are confirmed on test.
MODEL_OF_REGIME = {"demo": "DeepLabV3+", "long": "DeepLabV3+", "few": "DeepLabV3+",
                   "fpn": "Semantic FPN"}
CONFIRMED_PER_MODEL = {"DeepLabV3+": 2, "Semantic FPN": 1}


def baseline_of(setting):
    """The baseline of ``setting``'s regime (itself for a baseline)."""
    return BASELINE_OF_REGIME[SETTINGS[setting][0]]


# A schedule that exercises every code path in seconds (the numbers mean nothing).
QUICK_OPTS = [
    "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "2",
    RC + "WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0",
]
STAGES = {"screen": ("val", [0]), "confirmation": ("test", [0, 1, 2])}


def machine_description():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{cpu_model()}, {cores} cores, {device}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def register_few_scenes(train_set):
    """``<train_set>_<FEW_SCENES>``: the first FEW_SCENES scenes of ``train_set``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = f"{train_set}_{FEW_SCENES}"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: DatasetCatalog.get(train_set)[:FEW_SCENES])
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    metadata = MetadataCatalog.get(train_set).as_dict()
    metadata.pop("name", None)
    MetadataCatalog.get(name).set(**metadata)
    return name


def run_argv(setting, seed, output_dir, sets, extra_opts):
    """``train_net.py``'s arguments for one run; ``sets`` = {"train", "eval"} data set names."""
    regime, recipe, overrides = SETTINGS[setting]
    train = f"{sets['train']}_{FEW_SCENES}" if regime == "few" else sets["train"]
    return [
        "--config-file", os.path.join(CONFIG_DIR, recipe), *overrides,
        "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{sets['eval']}',)",
        "SEED", str(seed), "OUTPUT_DIR", output_dir, *extra_opts,
    ]


def evaluation_argv(argv, checkpoint):
    """``argv`` evaluating ``checkpoint`` instead of training."""
    return ["--eval-only", *argv, "MODEL.WEIGHTS", checkpoint]


def read_record(path, argv):
    """The record of a finished run with these arguments, or of the evaluation of a checkpoint
    trained with them; None if never run, or run with other arguments."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    stored = record.get("argv", [])
    if stored == argv or stored == evaluation_argv(argv, stored[-1] if stored else None):
        return record
    print(f"{path} was written by another command ({' '.join(stored)}); training again.",
          flush=True)
    return None


def train_one(setting, seed, stage, argv, record_path, trained_in=None):
    """Trains (or, with ``--eval-only``, only evaluates), diagnoses and records one run.

    ``trained_in``: the record of the run that trained the evaluated checkpoint, if not this one.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.engine import default_argument_parser
    from region_contrast.data.mapper import ValidatingDatasetMapper
    from region_contrast.engine import Trainer, load_config
    from region_contrast.engine import main as train_net_main
    from region_contrast.evaluation.diagnostics import feature_diagnostics

    args = default_argument_parser().parse_args(argv)
    commit = commit_description(REPO)  # the code that runs, read before it runs
    start = time.perf_counter()
    results = train_net_main(args)
    wall = time.perf_counter() - start
    if not results or "sem_seg" not in results:
        raise RuntimeError(f"Run {setting} seed {seed} finished without a sem_seg evaluation.")
    cfg = load_config(args.config_file, args.opts)
    model = Trainer.build_model(cfg)
    checkpoint = (cfg.MODEL.WEIGHTS if args.eval_only
                  else os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    DetectionCheckpointer(model).load(checkpoint)
    mapper = ValidatingDatasetMapper(cfg, is_train=True, augmentations=[])
    diagnostics = feature_diagnostics(model, DatasetCatalog.get(cfg.DATASETS.TEST[0]), mapper,
                                      feature_module=cfg.MODEL.REGION_CONTRAST.FEATURE_MODULE)
    record = {
        "setting": setting,
        "regime": SETTINGS[setting][0],
        "stage": stage,
        "seed": seed,
        "evaluated_on": cfg.DATASETS.TEST[0],
        "commit": commit,
        "machine": machine_description(),
        "date": datetime.date.today().isoformat(),
        "wall_s": wall,
        "argv": argv,
        "sem_seg": {k: float(v) for k, v in results["sem_seg"].items()},
        "diagnostics": diagnostics,
    }
    if trained_in is not None:
        record["trained_in"] = {k: trained_in[k] for k in (
            "stage", "commit", "machine", "date", "wall_s", "argv")}
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    atomic_write(record_path, lambda f: json.dump(record, f, indent=1), mode="w")
    return record


def run_paths(args, stage, setting, seed):
    """(checkpoint folder, record path) of one run."""
    name = f"{setting}_seed{seed}"
    return (os.path.join(args.output_dir, stage, name),
            os.path.join(args.records, stage, name + ".json"))


def screen_checkpoint(args, setting, seed, sets, extra):
    """The screen's record and final checkpoint of this setting and seed, or (None, None).

    Training does not read the evaluated split (no evaluation before the end), so the screen's
    run is a training of the confirmation's arguments and seed: its checkpoint is evaluated on
    test instead of spending the hours again. (In one process the two are identical, see the
    tests; across processes and commits a seed reproduces to a few tenths of a point only, e.g.
    ``make demo`` 67.0 against the screen's 67.3 for the same recipe and seed.)
    """
    out, path = run_paths(args, "screen", setting, seed)
    checkpoint = os.path.join(out, "model_final.pth")
    if not os.path.isfile(checkpoint):
        return None, None
    record = read_record(path, run_argv(setting, seed, out, sets, extra))
    return (record, checkpoint) if record is not None else (None, None)


def run_stage(stage, settings, seeds, args, sets, extra, screen_sets=None):
    """Runs (or reads back) every (setting, seed) of a stage; ``screen_sets``: reuse the
    screen's trained checkpoints, evaluated on this stage's split."""
    records = []
    todo = [(s, k) for s in settings for k in seeds]
    for i, (setting, seed) in enumerate(todo, 1):
        out, path = run_paths(args, stage, setting, seed)
        argv = run_argv(setting, seed, out, sets, extra)
        record = read_record(path, argv)
        if record is None:
            trained, checkpoint = (screen_checkpoint(args, setting, seed, screen_sets, extra)
                                   if screen_sets else (None, None))
            what = "training" if trained is None else "evaluating the screen's checkpoint of"
            print(f"[{stage} {i}/{len(todo)}] {what} {setting}, seed {seed} -> {out}",
                  flush=True)
            os.makedirs(out, exist_ok=True)
            if trained is not None:
                argv = evaluation_argv(argv, checkpoint)
            record = train_one(setting, seed, stage, argv, path, trained_in=trained)
        print(f"[{stage} {i}/{len(todo)}] {setting}, seed {seed}: mIoU "
              f"{record['sem_seg']['mIoU']:.2f}", flush=True)
        records.append(record)
    return records


def choose_for_confirmation(screen, count=CONFIRMED_PER_MODEL):
    """The RegionContrast settings to confirm, each after its regime's baseline.

    Settings are ranked by their val mIoU *minus the val mIoU of their regime's baseline*: a
    longer schedule raises every number, so raw mIoU would pick a regime, not a method. For each
    model, up to ``count[model]`` settings that beat their baseline are taken; if none does, the
    single closest one, so that the test split still says how large the difference is.
    """
    miou = {r["setting"]: r["sem_seg"]["mIoU"] for r in screen}
    gain = {s: v - miou[baseline_of(s)] for s, v in miou.items()
            if not s.startswith("baseline") and baseline_of(s) in miou}
    chosen = []
    for model, n in count.items():
        ranked = sorted((s for s in gain if MODEL_OF_REGIME[SETTINGS[s][0]] == model),
                        key=lambda s: -gain[s])
        chosen += [s for s in ranked if gain[s] > 0][:n] or ranked[:1]
    regimes = dict.fromkeys(SETTINGS[s][0] for s in chosen)
    # Each baseline right before its settings: tables and plot read as pairs.
    return [x for r in regimes
            for x in [BASELINE_OF_REGIME[r]] + [s for s in chosen if SETTINGS[s][0] == r]]


def summarise(records):
    """{setting: {"miou": (mean, std, n), "per_class": {...}, "diagnostics": {...}, "runs"}}."""
    out = {}
    for setting in dict.fromkeys(r["setting"] for r in records):
        runs = sorted((r for r in records if r["setting"] == setting), key=lambda r: r["seed"])
        miou = np.array([r["sem_seg"]["mIoU"] for r in runs])
        names = [k[4:] for k in runs[0]["sem_seg"] if k.startswith("IoU-")]
        out[setting] = {
            "miou": (float(miou.mean()), float(miou.std()), len(runs)),
            "per_class": {n: float(np.mean([r["sem_seg"][f"IoU-{n}"] for r in runs]))
                          for n in names},
            "diagnostics": {k: float(np.mean([r["diagnostics"][k] for r in runs]))
                            for k in runs[0]["diagnostics"]},
            "runs": runs,
        }
    return out


def verdicts(summary, margin=1.0):
    """Each RegionContrast setting against its regime's baseline, seed by seed, and the target:
    at least ``margin`` mIoU above on average, with the ranges over seeds not overlapping."""
    lines = []
    for setting, s in summary.items():
        base = summary.get(baseline_of(setting))
        if setting.startswith("baseline") or base is None or s["miou"][2] < 2:
            continue
        ours = {r["seed"]: r["sem_seg"]["mIoU"] for r in s["runs"]}
        theirs = {r["seed"]: r["sem_seg"]["mIoU"] for r in base["runs"]}
        paired = [ours[k] - theirs[k] for k in sorted(ours) if k in theirs]
        gain = s["miou"][0] - base["miou"][0]
        apart = min(ours.values()) > max(theirs.values())
        met = gain >= margin and apart
        lines.append(
            f"- {setting} against {baseline_of(setting)}: {gain:+.1f} mIoU "
            f"on average; per seed {', '.join(f'{d:+.1f}' for d in paired)}; ranges "
            f"{min(ours.values()):.1f}-{max(ours.values()):.1f} and "
            f"{min(theirs.values()):.1f}-{max(theirs.values()):.1f} "
            f"{'apart' if apart else 'overlap'}. Target ({margin:+.1f} on average, ranges "
            f"apart): **{'met' if met else 'not met'}**.")
    return lines


def table(title, summary, notes=()):
    """A stage's table, then ``notes``, then per-class IoU; "vs baseline" is against the baseline
    of the setting's regime."""
    lines = [f"## {title}", "",
             "| setting | regime | mIoU mean +/- std | vs baseline | runs (mIoU per seed) | "
             "digit as other digit | digit as background | NCM accuracy | scatter ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for setting, s in summary.items():
        mean, std, n = s["miou"]
        d = s["diagnostics"]
        seeds = ", ".join(f"{r['sem_seg']['mIoU']:.1f}" for r in s["runs"])
        base = summary.get(baseline_of(setting), {}).get("miou", [np.nan])[0]
        lines.append(
            f"| {setting} | {SETTINGS[setting][0]} | {mean:.1f} +/- {std:.1f} | "
            f"{mean - base:+.1f} | {n} ({seeds}) | "
            f"{100 * d['foreground_as_other_foreground']:.1f}% | "
            f"{100 * d['foreground_as_background']:.1f}% | {100 * d['ncm_accuracy']:.1f}% | "
            f"{d['scatter_ratio']:.2f} |")
    names = list(next(iter(summary.values()))["per_class"])
    lines += ["", *notes] if notes else []
    lines += ["", "Per-class IoU (mean over seeds):", "",
              "| class | " + " | ".join(summary) + " |", "|---|" + "---|" * len(summary)]
    for name in names:
        cells = [f"{s['per_class'][name]:.1f}" for s in summary.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_plot(path, stages):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), dpi=100,
                             squeeze=False)
    for ax, (title, summary) in zip(axes[0], stages):
        names = list(summary)
        means = [summary[s]["miou"][0] for s in names]
        stds = [summary[s]["miou"][1] for s in names]
        colors = ["#888888" if s.startswith("baseline") else "#1f77b4" for s in names]
        bars = ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
        for bar, s in zip(bars, names):
            values = [r["sem_seg"]["mIoU"] for r in summary[s]["runs"]]
            ax.scatter(np.full(len(values), bar.get_x() + bar.get_width() / 2), values,
                       color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("mIoU")
        ax.set_title(title, fontsize=10)
        low = min(means) - max(stds + [0.0]) - 5
        ax.set_ylim(max(0, low), max(means) + max(stds + [0.0]) + 3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--stage", choices=["screen", "confirmation", "all"], default="all")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                        help="screen these settings (default: all); confirmation: these "
                             "instead of the screen's best")
    parser.add_argument("--seeds", nargs="+", type=int, help="instead of the stage's seeds")
    parser.add_argument("--records", default=os.path.join(REPO, "results", "digit_scenes_study"),
                        help="folder of the run records (committed: the study resumes from it)")
    parser.add_argument("--output-dir", default=os.path.join("output", "study"),
                        help="one folder per run (checkpoints, logs, evaluation)")
    parser.add_argument("--results", default=os.path.join("results", "digit_scenes_study"),
                        help="path of the tables and plot, without extension")
    parser.add_argument("--data-prefix", default="digit_scenes",
                        help="data sets <prefix>_{train,val,test}")
    parser.add_argument("--quick", action="store_true",
                        help="4 iterations per run: checks the tool, the numbers mean nothing")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for every run (KEY VALUE ...), last")
    args = parser.parse_args(argv)

    import region_contrast  # noqa: F401  (registers the data sets)

    register_few_scenes(f"{args.data_prefix}_train")
    extra = (QUICK_OPTS if args.quick else []) + list(args.opts)

    def sets(stage):
        return {"train": f"{args.data_prefix}_train",
                "eval": f"{args.data_prefix}_{STAGES[stage][0]}"}

    def run(stage, settings, seeds):
        return run_stage(stage, settings, seeds, args, sets(stage), extra,
                         screen_sets=None if stage == "screen" else sets("screen"))

    done = {}
    if args.stage in ("screen", "all"):
        done["screen"] = run("screen", args.settings or list(SETTINGS),
                             args.seeds or STAGES["screen"][1])
    if args.stage in ("confirmation", "all"):
        settings = args.settings
        if not settings:
            if "screen" not in done:  # its records are read back; missing runs are trained
                done["screen"] = run("screen", list(SETTINGS), STAGES["screen"][1])
            settings = choose_for_confirmation(done["screen"])
        done["confirmation"] = run("confirmation", settings,
                                   args.seeds or STAGES["confirmation"][1])

    summaries = {stage: summarise(records) for stage, records in done.items()}
    commits = sorted({c for records in done.values() for r in records
                      for c in (r["commit"], r.get("trained_in", r)["commit"])})
    lines = ["# DigitScenes: where does region contrast help?", "",
             f"Written by `python tools/run_experiments.py` on {datetime.date.today()}"
             f"{' (--quick: the numbers mean nothing)' if args.quick else ''}. Settings are "
             "screened on val (seed 0); for each model (DeepLabV3+: regimes demo, long, few; "
             "Semantic FPN: regime fpn) the RegionContrast settings that gain most over the "
             "baseline of their regime on val are confirmed against that baseline on test "
             "(seeds 0-2; a seed the screen trained is its checkpoint evaluated on test).", "",
             "- Commits of the runs: " + ", ".join(commits),
             f"- Machine of this report: {machine_description()} (each record names its own)",
             f"- Overrides for every run: {' '.join(extra) or 'none'}",
             f"- Added to the screen after its other settings had run: "
             f"{', '.join(ADDED_AFTER_FIRST_SCREEN)}", ""]
    titles = {"screen": f"Screen ({args.data_prefix}_val)",
              "confirmation": f"Confirmation ({args.data_prefix}_test)"}
    for stage, summary in summaries.items():
        lines += table(titles[stage], summary,
                       notes=verdicts(summary) if stage == "confirmation" else ())
    results = os.path.abspath(args.results)
    os.makedirs(os.path.dirname(results), exist_ok=True)
    atomic_write(results + ".md", lambda f: f.write("\n".join(lines)), mode="w")
    write_plot(results + ".png", [(titles[s], summaries[s]) for s in summaries])
    print(f"wrote {args.results}.md and {args.results}.png")
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
