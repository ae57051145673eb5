"""
The benchmark data sets, from tiny stand-ins of the official downloads (tests/fixtures_raw.py)
to evaluated results: each prepare script's command line, every output pixel against the
official mapping, sources untouched, re-runs and interrupted runs, wrong layouts refused with a
useful message, the registrations, and two training iterations + evaluation through train_net.
"""
import contextlib
import hashlib
import importlib.util
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import region_contrast  # noqa: F401
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.evaluation import CityscapesSemSegEvaluator, DatasetEvaluators, SemSegEvaluator
from region_contrast.data import ade20k, cityscapes, coco_panoptic, coco_stuff
from region_contrast.data import prepare as P
from region_contrast.compat import alias_cityscapes_api
from region_contrast.engine import Trainer, main, setup
from region_contrast.evaluation import OfficialCityscapesSemSegEvaluator

import fixtures_raw as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "cityscapes": "prepare_cityscapes_sem_seg.py",
    "ade20k": "prepare_ade20k_sem_seg.py",
    "coco_stuff_164k": "prepare_coco_stuff_164k_sem_seg.py",
    "coco_stuff_10k": "prepare_coco_stuff_10k_sem_seg.py",
    "coco_panoptic": "prepare_coco_panoptic_stuff_sem_seg.py",
}
DATASETS = list(SCRIPTS)
PREFIX = "rcfix"
NUM_CLASSES = {"cityscapes": 19, "ade20k": 150, "coco_stuff_164k": 171, "coco_stuff_10k": 171,
               "coco_panoptic": 54}


def sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def snapshot(paths):
    return {p: (sha1(p), os.stat(p).st_mtime_ns) for p in paths}


def read_png(path):
    with Image.open(path) as img:
        return np.array(img)


def load_script(name):
    spec = importlib.util.spec_from_file_location(
        f"_script_{name}", os.path.join(REPO, "datasets", SCRIPTS[name])
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script_in_process(name, root, monkeypatch, *args):
    """The script's own main() (argument parsing, root from the environment, summary, errors)."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            load_script(name).main(["--no-progress", *args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """
    The five prepare scripts run as ``python datasets/<script>.py`` on their own copy of the raw
    data, started early and in the background (each pays ~5 s of importing torch and Detectron2,
    which overlaps with the in-process tests); ``test_command_line`` collects them at the end.
    """
    root = tmp_path_factory.mktemp("d2_datasets_cli")
    made = fx.make_all(str(root))
    sources = sorted({p for d in made.values() for p in d["sources"]})
    before = snapshot(sources)
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    procs = {}
    try:
        for name, script in SCRIPTS.items():
            # One of them on a pool of two processes, the path that large sets take.
            extra = ["--workers", "2"] if name == "ade20k" else []
            procs[name] = subprocess.Popen(
                [sys.executable, os.path.join("datasets", script), *extra],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        yield {"root": root, "made": made, "sources": sources, "before": before,
               "procs": procs}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None and not stream.closed:
                    stream.close()


@pytest.fixture(scope="module")
def raw(tmp_path_factory, cli_runs):
    """All five data sets in one root, prepared in-process by the scripts' own main()."""
    root = tmp_path_factory.mktemp("d2_datasets")
    made = fx.make_all(str(root))
    sources = sorted({p for d in made.values() for p in d["sources"]})
    before = snapshot(sources)
    logs = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in SCRIPTS:
            code, out, err = run_script_in_process(name, root, mp)
            assert code == 0, err
            logs[name] = out
    return {"root": root, "made": made, "sources": sources, "before": before, "logs": logs}


def check_outputs(name, made, log):
    """Every output pixel equals the independent reference; nothing else was left behind."""
    expected = made["expected"]
    assert log.rstrip().splitlines()[-1].startswith(
        f"Done: {len(expected) + len(made.get('images', {}))} files written, 0 already complete"
    ), log
    for path, ref in expected.items():
        assert os.path.isfile(path), path
        out = read_png(path)
        assert out.dtype == np.uint8 and out.shape == ref.shape, path
        mismatch = np.argwhere(out != ref)
        assert mismatch.size == 0, (
            f"{path}: {len(mismatch)} pixels differ, first at {mismatch[0].tolist()}: "
            f"{out[tuple(mismatch[0])]} != {ref[tuple(mismatch[0])]}"
        )
        num_classes = 133 if os.sep + "panoptic_semseg_" in path else NUM_CLASSES[name]
        assert set(np.unique(out).tolist()) <= set(range(num_classes)) | {255}
    # COCO-Stuff-10k lays its images out by link (or copy), never by moving them.
    for dst, src in made.get("images", {}).items():
        assert sha1(dst) == sha1(src) and os.path.isfile(src)


def temporary_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
            if f.startswith(P.TEMP_PREFIX)]


# ----------------------------------------------------------------------------------------------
# The prepare scripts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DATASETS)
def test_prepare_writes_the_official_mapping(raw, name):
    check_outputs(name, raw["made"][name], raw["logs"][name])
    assert not temporary_files(raw["root"])


def test_sources_unchanged(raw):
    assert snapshot(raw["sources"]) == raw["before"]


@pytest.mark.parametrize("name", DATASETS)
def test_rerun_is_a_noop(raw, name, monkeypatch):
    outputs = list(raw["made"][name]["expected"]) + list(raw["made"][name].get("images", {}))
    before = snapshot(outputs)
    code, out, err = run_script_in_process(name, raw["root"], monkeypatch)
    assert code == 0, err
    assert f"Done: 0 files written, {len(outputs)} already complete" in out, out
    assert snapshot(outputs) == before
    assert snapshot(raw["sources"]) == raw["before"]


@pytest.mark.parametrize("name", DATASETS)
def test_interrupted_run_is_completed(raw, name, monkeypatch):
    expected = raw["made"][name]["expected"]
    outputs = sorted(expected)
    contents = {p: sha1(p) for p in outputs}
    deleted = outputs[::2]
    for path in deleted:
        os.remove(path)
    # What a killed run leaves: a partial temporary file next to the outputs.
    stale = P.temp_path(outputs[0])
    with open(stale, "wb") as f:
        f.write(b"\x89PNG partial")
    kept = snapshot([p for p in outputs if p not in deleted])
    code, out, err = run_script_in_process(name, raw["root"], monkeypatch)
    assert code == 0, err
    assert f"{len(deleted)} files written" in out, out
    assert "temporary files of an interrupted run" in out
    assert not os.path.exists(stale)
    assert {p: sha1(p) for p in outputs} == contents
    assert snapshot(sorted(kept)) == kept
    assert snapshot(raw["sources"]) == raw["before"]


def test_temporary_names_are_invisible_to_loaders(raw):
    """A stale temporary file sitting in a label folder is not picked up as a sample."""
    names = coco_stuff.register_coco_stuff_164k(str(raw["root"]), name_prefix=PREFIX + "_tmp")
    gt_dir = MetadataCatalog.get(names[1]).sem_seg_root
    stale = P.temp_path(os.path.join(gt_dir, "000000000139.png"))
    with open(stale, "wb") as f:
        f.write(b"partial")
    try:
        assert len(DatasetCatalog.get(names[1])) == len(fx.COCO_IMAGES["val2017"])
    finally:
        os.remove(stale)
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_coco_stuff_10k_v1_0_matlab_73_files_are_read(tmp_path, monkeypatch):
    """The v1.0 release (MATLAB 7.3 = HDF5 files, other values) converts like v1.1 does."""
    made = fx.make_coco_stuff_10k(str(tmp_path), counts=(("train", 2), ("test", 1)),
                                  release="v1.0")
    before = snapshot(made["sources"])
    code, out, err = run_script_in_process("coco_stuff_10k", tmp_path, monkeypatch)
    assert code == 0, err
    check_outputs("coco_stuff_10k", made, out)
    assert snapshot(made["sources"]) == before
    # Both releases side by side in one folder are each read by their own format.
    s, release = coco_stuff.read_coco_stuff_10k_mat(made["sources"][1])
    assert release == "v1.0" and s.shape == read_png(next(iter(made["expected"]))).shape


def test_coco_stuff_10k_mat_without_s_names_the_file(tmp_path):
    path = str(tmp_path / "x.mat")
    fx.write_matlab_v73(path, {"L": np.zeros((2, 3))})
    with pytest.raises(P.InvalidLabelError, match=r"x\.mat: no variable 'S'.*\['L'\]"):
        coco_stuff.read_coco_stuff_10k_mat(path)


def test_invalid_source_value_is_refused(tmp_path, monkeypatch):
    made = fx.make_ade20k(str(tmp_path), counts=(("training", 1), ("validation", 1)))
    bad = [p for p in made["sources"] if "annotations" in p and "validation" in p][0]
    arr = read_png(bad)
    arr[3, 3] = 151
    Image.fromarray(arr).save(bad)
    code, out, err = run_script_in_process("ade20k", tmp_path, monkeypatch)
    assert code == 2
    assert bad in err and "151" in err
    out_dir = tmp_path / "ADEChallengeData2016" / "annotations_detectron2" / "validation"
    assert list(out_dir.iterdir()) == []  # neither the output nor a temporary file


def test_unknown_cityscapes_label_is_refused(tmp_path, monkeypatch):
    fx.make_cityscapes(str(tmp_path), counts=(("train", "aachen", 1), ("val", "bonn", 1)))
    polygons = next((tmp_path / "cityscapes" / "gtFine" / "val" / "bonn").glob("*.json"))
    polygons.write_text(polygons.read_text().replace('"sky"', '"not a cityscapes label"'))
    code, out, err = run_script_in_process("cityscapes", tmp_path, monkeypatch)
    assert code == 2 and str(polygons) in err
    assert not list((tmp_path / "cityscapes" / "gtFine" / "val" / "bonn").glob("*TrainIds*"))


def _layout_cityscapes(root):
    fx.make_cityscapes(root, counts=(("train", "aachen", 1), ("val", "bonn", 1)))
    os.rename(os.path.join(root, "cityscapes", "gtFine"), os.path.join(root, "gtFine"))
    return [os.path.join(root, "cityscapes", "gtFine", "train"), "gtFine_trainvaltest.zip",
            "move it to"]


def _layout_ade20k(root):
    fx.make_ade20k(os.path.join(root, "downloads"), counts=(("training", 1), ("validation", 1)))
    return [os.path.join(root, "ADEChallengeData2016", "annotations", "training"),
            "ADEChallengeData2016.zip"]


def _layout_coco_stuff_164k(root):
    _, sizes = fx.make_coco_images(root)
    fx.make_coco_stuff_164k(root, sizes)
    # stuffthingmaps_trainval2017.zip unzipped straight into coco/ (no -d coco/stuffthingmaps):
    # its PNGs land among the images.
    maps = os.path.join(root, "coco", "stuffthingmaps")
    for split in ("train2017", "val2017"):
        for name in os.listdir(os.path.join(maps, split)):
            os.rename(os.path.join(maps, split, name), os.path.join(root, "coco", split, name))
        os.rmdir(os.path.join(maps, split))
    os.rmdir(maps)
    return [os.path.join(root, "coco", "stuffthingmaps", "train2017"),
            "stuffthingmaps_trainval2017.zip", "unzip -d coco/stuffthingmaps"]


def _layout_coco_stuff_10k(root):
    # cocostuff-10k-v1.1.zip extracted with its own folder inside coco/coco_stuff_10k/.
    fx.make_coco_stuff_10k(os.path.join(root, "tmp"), counts=(("train", 1), ("test", 1)))
    os.makedirs(os.path.join(root, "coco", "coco_stuff_10k"))
    os.rename(os.path.join(root, "tmp", "coco", "coco_stuff_10k"),
              os.path.join(root, "coco", "coco_stuff_10k", "cocostuff-10k-v1.1"))
    base = os.path.join(root, "coco", "coco_stuff_10k")
    return [os.path.join(base, "imageLists", "test.txt"), "cocostuff-10k-v1.1.zip",
            f"{base}/cocostuff-10k-v1.1/imageLists exists: move it to {base}/imageLists"]


def _layout_coco_panoptic(root):
    _, sizes = fx.make_coco_images(root)
    fx.make_coco_panoptic(root, sizes)
    os.remove(os.path.join(root, "coco", "annotations", "panoptic_val2017.json"))
    return [os.path.join(root, "coco", "annotations", "panoptic_val2017.json"),
            "panoptic_annotations_trainval2017.zip"]


@pytest.mark.parametrize("name", DATASETS)
def test_wrong_layout_is_refused_with_a_useful_message(tmp_path, monkeypatch, name):
    root = str(tmp_path)
    wanted = globals()[f"_layout_{name}"](root)
    before = snapshot([os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs])
    code, out, err = run_script_in_process(name, root, monkeypatch)
    assert code == 2, (out, err)
    assert err.startswith("error: ")
    for text in wanted:
        assert text in err, f"{text!r} not in:\n{err}"
    assert "Expected tree" in err and f"DETECTRON2_DATASETS={root}" in err
    assert "datasets/prepare_" in err
    # Nothing was written or changed.
    assert snapshot([os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]) == before


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
def test_builtin_and_project_names_are_registered():
    expected = {
        "cityscapes_fine_sem_seg_train": (19, "cityscapes_sem_seg"),
        "cityscapes_fine_sem_seg_val": (19, "cityscapes_sem_seg"),
        "ade20k_sem_seg_train": (150, "sem_seg"),
        "ade20k_sem_seg_val": (150, "sem_seg"),
        "coco_2017_train_stuff_164k_sem_seg": (171, "sem_seg"),
        "coco_2017_val_stuff_164k_sem_seg": (171, "sem_seg"),
        "coco_2017_train_stuff_10k_sem_seg": (171, "sem_seg"),
        "coco_2017_test_stuff_10k_sem_seg": (171, "sem_seg"),
        "coco_2017_train_panoptic_stuffonly": (54, "sem_seg"),
        "coco_2017_val_panoptic_stuffonly": (54, "sem_seg"),
        "coco_2017_train_panoptic_sem_seg": (133, "sem_seg"),
        "coco_2017_val_panoptic_sem_seg": (133, "sem_seg"),
    }
    for name, (num, evaluator_type) in expected.items():
        assert name in DatasetCatalog.list(), name
        meta = MetadataCatalog.get(name)
        assert len(meta.stuff_classes) == num, name
        assert meta.evaluator_type == evaluator_type and meta.ignore_label == 255, name
    # The names other Detectron2 projects use for COCO-Stuff-164k: the same folders.
    for alias, ours in (("coco_2017_train_stuff_sem_seg", "coco_2017_train_stuff_164k_sem_seg"),
                        ("coco_2017_test_stuff_sem_seg", "coco_2017_val_stuff_164k_sem_seg")):
        a, b = MetadataCatalog.get(alias), MetadataCatalog.get(ours)
        assert (a.image_root, a.sem_seg_root) == (b.image_root, b.sem_seg_root), alias
        assert a.stuff_classes == b.stuff_classes and a.evaluator_type == "sem_seg", alias
    # Predictions are saved with the data set's own category ids: COCO ids for COCO-Stuff
    # (1 person, 90 toothbrush, 92 banner, 182 wood), COCO panoptic ids for the 133 classes.
    for name in ("coco_2017_train_stuff_164k_sem_seg", "coco_2017_test_stuff_10k_sem_seg",
                 "coco_2017_test_stuff_sem_seg"):
        ids = MetadataCatalog.get(name).stuff_dataset_id_to_contiguous_id
        assert sorted(ids.values()) == list(range(171)), name
        assert (ids[1], ids[90], ids[92], ids[182]) == (0, 79, 80, 170), name
    ids = MetadataCatalog.get("coco_2017_val_panoptic_sem_seg").stuff_dataset_id_to_contiguous_id
    assert sorted(ids.values()) == list(range(133))
    assert (ids[1], ids[90], ids[92], ids[200]) == (0, 79, 80, 132)


def test_coco_stuff_classes_are_the_official_ones():
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    things = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
    assert coco_stuff.COCO_STUFF_CLASSES[:80] == things
    thing_ids = sorted(c["id"] for c in COCO_CATEGORIES if c["isthing"])
    assert sorted(set(range(1, 92)) - set(thing_ids)) == fx.COCO_UNUSED_IDS
    assert coco_stuff.UNUSED_COCO_IDS == fx.COCO_UNUSED_IDS
    # COCO panoptic keeps the COCO-Stuff id and name of each stuff class it did not merge.
    ours = dict(coco_stuff.COCO_STUFF_CATEGORIES)
    unmerged = [c for c in COCO_CATEGORIES if not c["isthing"] and c["id"] <= 182]
    assert len(unmerged) > 30
    for c in unmerged:
        assert ours[c["id"]] == c["name"]
    assert len(coco_stuff.COCO_STUFF_CLASSES) == 171 == len(set(coco_stuff.COCO_STUFF_CLASSES))
    # The package's tables agree with the reference one, on every possible byte.
    table = fx.coco_stuff_raw_reference_table()
    assert [int(coco_stuff.RAW_LUT[v]) for v in range(256)] == [table[v] for v in range(256)]


_REGISTER_FUNCTIONS = {
    "cityscapes": cityscapes.register_cityscapes_sem_seg,
    "ade20k": ade20k.register_ade20k,
    "coco_stuff_164k": coco_stuff.register_coco_stuff_164k,
    "coco_stuff_10k": coco_stuff.register_coco_stuff_10k,
    "coco_panoptic": coco_panoptic.register_coco_panoptic_stuffonly,
}
# Registration under test names, rooted at a fixture root: returns [train, evaluation, ...].
REGISTER = {
    name: (lambda root, prefix, f=f: f(root, name_prefix=prefix))
    for name, f in _REGISTER_FUNCTIONS.items()
}


@pytest.mark.parametrize("name", DATASETS)
def test_missing_split_raises_a_helpful_error(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    names = REGISTER[name](str(tmp_path), f"{PREFIX}_missing_{name}")
    try:
        for split in names:
            with pytest.raises(FileNotFoundError) as info:
                DatasetCatalog.get(split)
            msg = str(info.value)
            assert split in msg and str(tmp_path) in msg, msg
            assert "DETECTRON2_DATASETS" in msg and f"datasets/{SCRIPTS[name]}" in msg, msg
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_cityscapes_without_train_ids_says_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    fx.make_cityscapes(str(tmp_path), counts=(("train", "aachen", 1), ("val", "bonn", 1)))
    names = cityscapes.register_cityscapes_sem_seg(str(tmp_path), name_prefix=PREFIX + "_nolabels")
    try:
        with pytest.raises(FileNotFoundError, match="prepare_cityscapes_sem_seg.py"):
            DatasetCatalog.get(names[0])
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def register_fixture(name, root):
    """Registers the fixture under test names; returns (names, train name, evaluation name)."""
    names = REGISTER[name](root, f"{PREFIX}_{name}")
    return names, names[0], names[1]


@pytest.fixture
def registered(raw, request):
    name = request.param
    names, train, test = register_fixture(name, str(raw["root"]))
    yield name, train, test
    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


@pytest.mark.parametrize("registered", DATASETS, indirect=True)
def test_registered_fixture_loads(raw, registered):
    name, train, test = registered
    expected = raw["made"][name]["expected"]
    for split in (train, test):
        meta = MetadataCatalog.get(split)
        assert len(meta.stuff_classes) == NUM_CLASSES[name]
        dicts = DatasetCatalog.get(split)
        assert dicts
        for d in dicts:
            assert os.path.isfile(d["file_name"]) and d["sem_seg_file_name"] in expected
            with Image.open(d["file_name"]) as img:
                assert img.size[::-1] == expected[d["sem_seg_file_name"]].shape
    total = len(DatasetCatalog.get(train)) + len(DatasetCatalog.get(test))
    assert total == len([p for p in expected if os.sep + "panoptic_semseg_" not in p])


def test_panoptic_133_class_maps_load(raw):
    """The stretch set: 133-class semantic maps from COCO panoptic, contiguous in id order."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    names = coco_panoptic.register_coco_panoptic_sem_seg(str(raw["root"]), name_prefix=PREFIX)
    try:
        expected = raw["made"]["coco_panoptic"]["expected"]
        loaded = []
        for name in names:
            meta = MetadataCatalog.get(name)
            assert meta.stuff_classes == [c["name"] for c in COCO_CATEGORIES]
            # Contiguous maps; predictions are saved with the panoptic category ids.
            assert meta.stuff_dataset_id_to_contiguous_id == {
                c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
            loaded += [d["sem_seg_file_name"] for d in DatasetCatalog.get(name)]
        assert sorted(loaded) == sorted(p for p in expected if "panoptic_semseg_" in p)
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


# ----------------------------------------------------------------------------------------------
# Training and evaluation through train_net.py
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registered", DATASETS, indirect=True)
def test_two_iterations_train_and_evaluate(registered, tmp_path, one_thread):
    name, train, test = registered
    opts = [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(NUM_CLASSES[name]),
        "MODEL.REGION_CONTRAST.ENABLED", "True",
        # A small bank: the default (1000 per class) is ~175 MB for 171 classes, checkpointed.
        "MODEL.REGION_CONTRAST.MEMORY_SIZE", "8",
        "DATASETS.TRAIN", f"('{train}',)",
        "DATASETS.TEST", f"('{test}',)",
        "SOLVER.MAX_ITER", "2",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128",
        # Stride-32 features of a 32 x 32 crop: ASPP pools 1 x 1, so any test size works.
        "INPUT.CROP.SIZE", "(32, 32)",
        "OUTPUT_DIR", str(tmp_path),
    ]
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs", "Base-DigitScenes.yaml"), *opts]
    )
    evaluator = Trainer.build_evaluator(setup(args), test)
    if name == "cityscapes":
        # The official evaluation and Detectron2's beside it: both results are checked below.
        assert isinstance(evaluator, DatasetEvaluators), evaluator
    else:
        assert isinstance(evaluator, SemSegEvaluator), evaluator
    # Training ends with an evaluation (Detectron2's EvalHook); --eval-only evaluates again.
    main(args)
    assert os.path.exists(tmp_path / "model_final.pth")
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs", "Base-DigitScenes.yaml"),
         "--eval-only", *opts, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")]
    )
    results = main(args)
    # On Cityscapes, "sem_seg" is the official evaluation's, as in Detectron2.
    metrics = results["sem_seg_detectron2" if name == "cityscapes" else "sem_seg"]
    assert set(metrics) >= {"mIoU", "fwIoU", "mACC", "pACC"}
    assert 0 <= metrics["mIoU"] <= 100
    # SemSegEvaluator scored every class of the data set.
    assert sum(k.startswith("IoU-") for k in metrics) == NUM_CLASSES[name]
    assert os.path.exists(tmp_path / "inference" / test / "sem_seg_evaluation.pth")
    if name == "cityscapes":
        # The official Cityscapes evaluation ran as well (on gtFine/val/*_gtFine_labelIds.png).
        assert set(results["sem_seg"]) == {"IoU", "iIoU", "IoU_sup", "iIoU_sup"}, results


def test_official_cityscapes_evaluation_agrees_with_the_train_ids(raw, monkeypatch):
    """
    The labelTrainIds written by the prepare script, given as predictions to the official
    Cityscapes evaluation (which maps them back to label ids and compares with the zip's
    *_gtFine_labelIds.png), score 100 IoU: both encodings say the same thing on every
    evaluated pixel.
    """
    names = REGISTER["cityscapes"](str(raw["root"]), f"{PREFIX}_cs_eval")
    try:
        # Detectron2's evaluator, which on Detectron2 main needs the alias of cityscapesscripts.
        evaluator = OfficialCityscapesSemSegEvaluator(names[1])
        assert isinstance(evaluator, CityscapesSemSegEvaluator)
        evaluator.reset()
        for d in DatasetCatalog.get(names[1]):
            train_ids = torch.from_numpy(read_png(d["sem_seg_file_name"]).astype(np.int64))
            train_ids[train_ids == 255] = 0  # ignored in the evaluation anyway
            logits = torch.nn.functional.one_hot(train_ids, 19).permute(2, 0, 1).float()
            evaluator.process([d], [{"sem_seg": logits}])
        with contextlib.redirect_stdout(io.StringIO()):
            result = evaluator.evaluate()
        assert result["sem_seg"]["IoU"] == pytest.approx(100.0)
        assert result["sem_seg"]["IoU_sup"] == pytest.approx(100.0)
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_cityscapes_alias_only_where_detectron2_imports_meta_internal_paths():
    import inspect

    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as official
    from detectron2.evaluation import cityscapes_evaluation

    broken = "deeplearning.projects.cityscapesApi" in inspect.getsource(cityscapes_evaluation)
    assert alias_cityscapes_api() == broken
    alias = "deeplearning.projects.cityscapesApi.cityscapesscripts"
    assert (alias in sys.modules) == broken
    if broken:  # the same modules, not copies: the official evaluation runs unchanged
        assert sys.modules[alias + ".evaluation.evalPixelLevelSemanticLabeling"] is official


# ----------------------------------------------------------------------------------------------
# The command lines, started by the cli_runs fixture (last: they ran in the background)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DATASETS)
def test_command_line(cli_runs, name):
    proc = cli_runs["procs"][name]
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{SCRIPTS[name]} failed:\n{stdout}\n{stderr}"
    check_outputs(name, cli_runs["made"][name], stdout)
    # The progress bar went to stderr.
    assert "100%" in stderr
    assert snapshot(cli_runs["sources"]) == cli_runs["before"]


def test_command_lines_left_no_temporary_files(cli_runs):
    for proc in cli_runs["procs"].values():
        proc.wait(timeout=300)
    assert not temporary_files(cli_runs["root"])
