"""
Evaluation: sliding-window inference, multi-scale + flip test-time augmentation, --eval-only with
TTA through train_net, and the paper-scale recipes under configs/ (twins, load, build).
"""
import glob
import os
import re

import pytest
import torch

import region_contrast  # noqa: F401
from conftest import unregister
from conftest import make_cfg as tiny_cfg
from detectron2.data.transforms import ResizeTransform
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import SemanticSegmentor, build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from region_contrast import RegionContrastSegmentor
from region_contrast.engine import get_region_contrast_cfg, main
from region_contrast.modeling.sliding_window import window_starts
from region_contrast.evaluation.test_time_augmentation import SemanticSegmentorWithTTA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 5


# --------------------------------------------------------------------------------------------
# Small models


def make_cfg(crop=None, window=None, stride=None, batch_size=4, enabled=True):
    """The shared tiny model, narrower; ``crop`` fixes the ASPP pooling window."""
    cfg = tiny_cfg(num_classes=NUM_CLASSES, enabled=enabled, PROJ_DIM=8, MEMORY_SIZE=4)
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 16
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS = [8]
    cfg.INPUT.CROP.ENABLED = crop is not None
    if crop is not None:
        cfg.INPUT.CROP.SIZE = crop
    if window is not None or stride is not None:
        cfg.TEST.SLIDING_WINDOW.ENABLED = True
        cfg.TEST.SLIDING_WINDOW.CROP_SIZE = list(window or [])
        cfg.TEST.SLIDING_WINDOW.STRIDE = list(stride or [])
        cfg.TEST.SLIDING_WINDOW.BATCH_SIZE = batch_size
    return cfg


def build_eval(cfg, state=None):
    torch.manual_seed(0)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    # Non-trivial BatchNorm statistics, so that padding and window borders matter.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and state is None:
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def random_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float()


def whole_image_logits(model, image, height=None, width=None):
    """The parent's (Detectron2's) inference on one image, bypassing any sliding window."""
    inp = {"image": image}
    if height is not None:
        inp.update(height=height, width=width)
    with torch.no_grad():
        return SemanticSegmentor.forward(model, [inp])[0]["sem_seg"]


def predict(model, image, height=None, width=None):
    inp = {"image": image}
    if height is not None:
        inp.update(height=height, width=width)
    with torch.no_grad():
        return model([inp])[0]["sem_seg"]


# --------------------------------------------------------------------------------------------
# Sliding window


def test_window_starts_cover_the_side_and_end_at_the_border():
    assert window_starts(64, 64, 40) == [0]
    assert window_starts(50, 64, 40) == [0]  # smaller than the window: padded, one window
    assert window_starts(100, 64, 40) == [0, 36]
    assert window_starts(200, 64, 64) == [0, 64, 128, 136]
    assert window_starts(683, 512, 341) == [0, 171]
    for length, window, stride in [(100, 64, 40), (777, 96, 33), (130, 64, 64)]:
        starts = window_starts(length, window, stride)
        covered = torch.zeros(length)
        for s in starts:
            covered[s : s + window] += 1
        assert starts[-1] == length - window and (covered > 0).all()
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="gaps"):
        window_starts(100, 32, 40)


def test_window_covering_the_image_equals_whole_image_inference():
    # The DeepLab ASPP pools over a window fixed by the 96x128 crop; the image is that size.
    plain = build_eval(make_cfg(crop=(96, 128)))
    # CROP_SIZE empty: the window is INPUT.CROP.SIZE.
    sliding = build_eval(make_cfg(crop=(96, 128), stride=[96, 128]), plain.state_dict())
    assert sliding.window_size == (96, 128)
    image = random_image(96, 128)
    for size in [(96, 128), (120, 150)]:  # at the input resolution, and resized like the parent
        expected = predict(plain, image, *size)
        assert torch.equal(predict(sliding, image, *size), expected)


def test_window_larger_than_the_image_pads_it_like_training():
    # A 80x100 image in a 96x128 window: padded at the bottom/right with the pixel mean (0 once
    # normalised, as ValidatingDatasetMapper pads training crops), the padding cut off again.
    plain = build_eval(make_cfg(crop=(96, 128)))
    sliding = build_eval(make_cfg(crop=(96, 128), window=[96, 128], stride=[64, 64]),
                         plain.state_dict())
    image = random_image(80, 100, seed=1)
    padded = plain.pixel_mean.view(3, 1, 1).expand(3, 96, 128).clone()
    padded[:, :80, :100] = image
    expected = sem_seg_postprocess(whole_image_logits(plain, padded), (80, 100), 80, 100)
    torch.testing.assert_close(predict(sliding, image), expected, rtol=0, atol=1e-5)


def loop_reference(model, image, window, stride):
    """Slow reference: every window through the parent's inference alone, then the mean."""
    (wh, ww), (sh, sw) = window, stride
    _, h, w = image.shape

    def starts(length, size, step):
        out = list(range(0, max(length - size, 0) + 1, step))
        if out[-1] + size < length:
            out.append(length - size)
        return out

    total = torch.zeros(NUM_CLASSES, h, w)
    count = torch.zeros(1, h, w)
    for y in starts(h, wh, sh):
        for x in starts(w, ww, sw):
            total[:, y : y + wh, x : x + ww] += whole_image_logits(model, image[:, y : y + wh,
                                                                                x : x + ww])
            count[:, y : y + wh, x : x + ww] += 1
    assert count.max() > 1, "the windows should overlap"
    return total / count


@pytest.mark.parametrize("batch_size", [1, 4])
def test_overlapping_windows_match_a_loop_over_windows(batch_size):
    # 100x150 in 64x64 windows every (40, 48): 2 x 3 windows, the last ones moved to the border.
    plain = build_eval(make_cfg(crop=(64, 64)))
    sliding = build_eval(
        make_cfg(crop=(64, 64), window=[64, 64], stride=[40, 48], batch_size=batch_size),
        plain.state_dict(),
    )
    image = random_image(100, 150, seed=2)
    reference = loop_reference(plain, image, (64, 64), (40, 48))
    torch.testing.assert_close(predict(sliding, image), reference, rtol=1e-4, atol=1e-4)
    # Output resized to the record's height x width, as the parent does.
    resized = sem_seg_postprocess(reference, (100, 150), 50, 75)
    torch.testing.assert_close(predict(sliding, image, 50, 75), resized, rtol=1e-4, atol=1e-4)


def test_sliding_window_is_off_by_default_and_rejects_gaps():
    assert build_model(make_cfg(crop=(64, 64))).window_size is None
    with pytest.raises(ValueError, match="TEST.SLIDING_WINDOW.STRIDE"):
        build_model(make_cfg(crop=(64, 64), window=[64, 64], stride=[80, 32]))
    with pytest.raises(ValueError, match="TEST.SLIDING_WINDOW.CROP_SIZE"):
        build_model(make_cfg(crop=None, stride=[32, 32]))  # no crop to default to


# --------------------------------------------------------------------------------------------
# Test-time augmentation


def tta(model, min_sizes, flip, max_size=1000):
    cfg = make_cfg()
    cfg.TEST.AUG.MIN_SIZES = tuple(min_sizes)
    cfg.TEST.AUG.MAX_SIZE = max_size
    cfg.TEST.AUG.FLIP = flip
    return SemanticSegmentorWithTTA(cfg, model).eval()


def uint8_image(h, w, seed=0):
    return random_image(h, w, seed).to(torch.uint8)  # as the dataset mapper hands it over


def test_tta_one_scale_without_flip_is_the_plain_model():
    model = build_eval(make_cfg())  # no crop: whole-image inference at any size
    image = uint8_image(64, 80, seed=3)
    for height, width in [(64, 80), (128, 160)]:  # input at the original size, or downscaled
        plain = predict(model, image, height, width)
        with torch.no_grad():
            out = tta(model, [64], flip=False)([{"image": image, "height": height,
                                                "width": width}])[0]["sem_seg"]
        assert out.shape == (NUM_CLASSES, height, width)
        torch.testing.assert_close(out, plain.softmax(0), rtol=1e-5, atol=1e-6)
        assert torch.equal(out.argmax(0), plain.argmax(0))


def test_tta_flip_on_a_mirror_symmetric_image_is_symmetric():
    model = build_eval(make_cfg())
    half = uint8_image(64, 40, seed=4)
    image = torch.cat([half, half.flip(-1)], dim=-1)  # 64x80, equal to its mirror image
    plain = predict(model, image).softmax(0)
    with torch.no_grad():
        out = tta(model, [64], flip=True)([{"image": image}])[0]["sem_seg"]
    # The mirrored pass sees the same image; mirrored back it is the plain output mirrored.
    torch.testing.assert_close(out, (plain + plain.flip(-1)) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, out.flip(-1), rtol=1e-5, atol=1e-6)


def test_tta_multi_scale_averages_probabilities_at_the_original_resolution():
    model = build_eval(make_cfg())
    image = uint8_image(48, 60, seed=5)
    inp = {"image": image, "height": 96, "width": 120}
    with torch.no_grad():
        out = tta(model, [32, 48, 72], flip=True)([inp])[0]["sem_seg"]
        # By hand: the input resized to each scale of the original 96x120 (shortest edge 32,
        # 48, 72), evaluated as is and mirrored, mirrored back, at 96x120, averaged.
        array = image.permute(1, 2, 0).numpy()
        probs = []
        for h, w in [(32, 40), (48, 60), (72, 90)]:
            scaled = ResizeTransform(48, 60, h, w).apply_image(array) if h != 48 else array
            scaled = torch.as_tensor(scaled.transpose(2, 0, 1).copy())
            probs.append(predict(model, scaled, 96, 120).softmax(0))
            probs.append(predict(model, scaled.flip(-1), 96, 120).softmax(0).flip(-1))
    assert out.shape == (NUM_CLASSES, 96, 120)
    torch.testing.assert_close(out.sum(0), torch.ones(96, 120))
    torch.testing.assert_close(out, torch.stack(probs).mean(0), rtol=1e-5, atol=1e-6)


def test_tta_works_with_sliding_windows_at_any_scale():
    # A crop-fixed ASPP only runs on multiples of the crop; sliding windows take any scale.
    model = build_eval(make_cfg(crop=(64, 64), window=[64, 64], stride=[48, 48]))
    with torch.no_grad():
        out = tta(model, [40, 64, 100], flip=True)([{"image": uint8_image(64, 80)}])[0]
    assert out["sem_seg"].shape == (NUM_CLASSES, 64, 80)


# --------------------------------------------------------------------------------------------
# train_net: --eval-only and the end of training with TEST.AUG.ENABLED


def tta_opts(output_dir, max_iter, min_sizes="(128,)", sliding=False):
    opts = [
        "DATASETS.TRAIN", "('tiny_digit_scenes_train',)",
        "DATASETS.TEST", "('tiny_digit_scenes_val',)",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(output_dir),
        "TEST.AUG.ENABLED", "True",
        "TEST.AUG.MIN_SIZES", min_sizes,
        "TEST.AUG.MAX_SIZE", "256",
        # The flip is checked above; here it would only double the CPU time.
        "TEST.AUG.FLIP", "False",
    ]
    if sliding:
        opts += ["TEST.SLIDING_WINDOW.ENABLED", "True", "TEST.SLIDING_WINDOW.STRIDE", "(96, 96)"]
    return opts


DIGIT_RC_RECIPE = sorted(
    glob.glob(os.path.join(REPO, "configs", "DigitScenes", "*region_contrast*.yaml"))
)[0]


def run(opts, *flags):
    args = default_argument_parser().parse_args(
        ["--config-file", DIGIT_RC_RECIPE, *flags, *opts]
    )
    return main(args)


def test_eval_only_with_tta_returns_both_evaluations(tiny_scenes, tmp_path):
    # Scales 0.75x and 1.25x in 128x128 windows (the crop): one padded window, and 2x2 windows.
    opts = tta_opts(tmp_path, 1, min_sizes="(96, 160)", sliding=True)
    results = run(opts + ["MODEL.WEIGHTS", ""], "--eval-only")
    assert set(results) == {"sem_seg", "sem_seg_TTA"}
    assert set(results["sem_seg_TTA"]) >= {"mIoU", "fwIoU", "mACC", "pACC"}
    assert os.path.exists(tmp_path / "inference_TTA" / "tiny_digit_scenes_val"
                          / "sem_seg_evaluation.pth")


def test_eval_only_with_detectron2s_default_tta_scales(tiny_scenes, tmp_path):
    """As a new user types it: the recipe, --eval-only, TEST.AUG.ENABLED True. Detectron2's
    default scales (400, 500, ..., 1200, flip) do not tile the 128x128 pooling window; the first
    two of them keep the test within seconds (any size is checked below)."""
    one = "tiny_digit_scenes_val_one"
    DatasetCatalog.register(one, lambda: DatasetCatalog.get("tiny_digit_scenes_val")[:1])
    MetadataCatalog.get(one).set(**{k: v for k, v in MetadataCatalog.get(
        "tiny_digit_scenes_val").as_dict().items() if k != "name"})
    try:
        results = run([
            "DATASETS.TEST", f"('{one}',)", "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", "",
            "TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(400, 500)"], "--eval-only")
    finally:
        unregister([one])
    assert set(results) == {"sem_seg", "sem_seg_TTA"}
    assert 0 <= results["sem_seg_TTA"]["mIoU"] <= 100


def test_scales_that_do_not_tile_the_pooling_window_are_evaluated_in_windows():
    model = build_model(tiny_cfg())  # DeepLabV3+ whose ASPP pools over the 64x64 crop
    assert isinstance(model, RegionContrastSegmentor) and model.tile_size == (64, 64)
    model.eval()
    odd = {"image": uint8_image(100, 150).float(), "height": 100, "width": 150}
    tiled = {"image": uint8_image(128, 192).float(), "height": 128, "width": 192}
    with torch.no_grad():
        got = model([odd])[0]["sem_seg"]
        expected = model.sliding_window_inference([odd], (64, 64), (42, 42))[0]["sem_seg"]
        assert torch.equal(got, expected)
        # Sizes that tile it are evaluated whole, as Detectron2's SemanticSegmentor does.
        whole = SemanticSegmentor.forward(model, [tiled])[0]["sem_seg"]
        assert torch.equal(model([tiled])[0]["sem_seg"], whole)


def test_training_ends_with_a_tta_evaluation(tiny_scenes, tmp_path):
    results = run(tta_opts(tmp_path, 1))
    assert set(results) == {"sem_seg", "sem_seg_TTA"}
    assert 0 <= results["sem_seg_TTA"]["mIoU"] <= 100


# --------------------------------------------------------------------------------------------
# The benchmark recipes

BENCHMARKS = {
    # folder: (data set slug in the names, classes, training set, evaluation set)
    "Cityscapes": ("cityscapes", 19, "cityscapes_fine_sem_seg_train",
                   "cityscapes_fine_sem_seg_val"),
    "ADE20K": ("ade20k", 150, "ade20k_sem_seg_train", "ade20k_sem_seg_val"),
    "COCO-Stuff-164k": ("coco_stuff_164k", 171, "coco_2017_train_stuff_164k_sem_seg",
                        "coco_2017_val_stuff_164k_sem_seg"),
    "COCO-Stuff-10k": ("coco_stuff_10k", 171, "coco_2017_train_stuff_10k_sem_seg",
                       "coco_2017_test_stuff_10k_sem_seg"),
    "COCO-Panoptic-Stuff": ("coco_panoptic_stuff", 54, "coco_2017_train_panoptic_stuffonly",
                            "coco_2017_val_panoptic_stuffonly"),
}
NAME = re.compile(
    r"deeplab_(?P<head>v3_plus|v3)_R_101_os(?P<os>8|16)_"
    r"(?P<rc>region_contrast_(?P<proj>proj256_)?)?"
    r"(?P<data>[a-z0-9_]+)_(?P<iters>\d+)k_bs(?P<batch>\d+)\.yaml"
)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def load(path):
    cfg = get_region_contrast_cfg()
    cfg.merge_from_file(path)
    return cfg


def recipes(folder):
    return sorted(glob.glob(os.path.join(REPO, "configs", folder, "deeplab_*.yaml")))


@pytest.mark.parametrize("folder", sorted(BENCHMARKS))
def test_benchmark_recipes_spell_their_settings_and_come_in_twins(folder):
    slug, classes, train, test = BENCHMARKS[folder]
    assert os.path.exists(os.path.join(REPO, "configs", folder, f"Base-{folder}.yaml"))
    paths = recipes(folder)
    heads = set()
    for path in paths:
        m = NAME.fullmatch(os.path.basename(path))
        assert m and m["data"] == slug, path
        cfg = load(path)
        heads.add(m["head"])
        assert cfg.MODEL.META_ARCHITECTURE == "RegionContrastSegmentor"
        assert cfg.MODEL.SEM_SEG_HEAD.NAME == {
            "v3_plus": "RegionContrastDeepLabV3PlusHead", "v3": "RegionContrastDeepLabV3Head"
        }[m["head"]]
        assert cfg.MODEL.REGION_CONTRAST.ENABLED == bool(m["rc"])
        # No projection head unless the name says so (the release's and the study's setting).
        assert cfg.MODEL.REGION_CONTRAST.PROJ_DIM == (256 if m["proj"] else 0)
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH) == (
            int(m["iters"]) * 1000, int(m["batch"]))
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == classes
        assert cfg.DATASETS.TRAIN == (train,) and cfg.DATASETS.TEST == (test,)
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet_deeplab_backbone"
        res = cfg.MODEL.RESNETS
        assert res.DEPTH == 101 and res.NORM == cfg.MODEL.SEM_SEG_HEAD.NORM == "SyncBN"
        assert (res.RES4_DILATION, res.RES5_DILATION) == {"8": (2, 4), "16": (1, 2)}[m["os"]]
        # The pretrained weights' stem and input conventions.
        if cfg.MODEL.WEIGHTS.endswith("MSRA/R-101.pkl"):
            assert (res.STEM_TYPE, res.STEM_OUT_CHANNELS, res.STRIDE_IN_1X1) == ("basic", 64, True)
            assert cfg.INPUT.FORMAT == "BGR" and list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]
        else:
            assert cfg.MODEL.WEIGHTS.endswith("DeepLab/R-103.pkl")
            assert (res.STEM_TYPE, res.STEM_OUT_CHANNELS, res.STRIDE_IN_1X1) == (
                "deeplab", 128, False)
        assert cfg.OUTPUT_DIR.endswith(os.path.basename(path)[: -len(".yaml")])
        # The bank fits comfortably on any GPU.
        rc = cfg.MODEL.REGION_CONTRAST
        dim = rc.PROJ_DIM or (cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM if m["head"] == "v3_plus"
                              else cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS)
        nbytes = classes * rc.MEMORY_SIZE * dim * DTYPE_BYTES[rc.MEMORY_DTYPE]
        assert nbytes < 200e6 and rc.WARMUP_ITERS > 0
        # Whole-image evaluation (and TTA) needs sizes that the crop-fixed ASPP pooling tiles.
        if not cfg.TEST.SLIDING_WINDOW.ENABLED:
            crop = cfg.INPUT.CROP.SIZE
            assert slug == "cityscapes"  # 1024x2048 images: a known size
            for short in [cfg.INPUT.MIN_SIZE_TEST, *cfg.TEST.AUG.MIN_SIZES]:
                assert short % crop[0] == 0 and (2 * short) % crop[1] == 0, short
        if m["proj"]:
            # The paper's projection head on the otherwise same twin.
            twin = load(path.replace("_proj256_", "_"))
            twin.MODEL.REGION_CONTRAST.PROJ_DIM, twin.OUTPUT_DIR = 256, cfg.OUTPUT_DIR
            assert cfg == twin, path
        if not m["rc"]:
            twin_path = path.replace(f"_{slug}_", f"_region_contrast_{slug}_")
            assert os.path.exists(twin_path), f"no RegionContrast twin for {path}"
            twin = load(twin_path)
            # The same model: the configs differ in the switch and the output folder only.
            cfg.MODEL.REGION_CONTRAST.ENABLED = True
            cfg.OUTPUT_DIR = twin.OUTPUT_DIR
            assert cfg == twin, twin_path
    assert heads == {"v3_plus", "v3"}, folder


# One build per data set family, alternating heads and the switch (an R-101 build takes seconds).
BUILDS = [
    "Cityscapes/deeplab_v3_plus_R_101_os8_region_contrast_cityscapes_80k_bs8.yaml",
    "ADE20K/deeplab_v3_R_101_os8_region_contrast_ade20k_160k_bs16.yaml",
    "COCO-Stuff-164k/deeplab_v3_plus_R_101_os8_coco_stuff_164k_80k_bs16.yaml",
    "COCO-Stuff-10k/deeplab_v3_R_101_os8_coco_stuff_10k_40k_bs16.yaml",
    "COCO-Panoptic-Stuff/"
    "deeplab_v3_plus_R_101_os8_region_contrast_coco_panoptic_stuff_80k_bs16.yaml",
]


@pytest.mark.parametrize("recipe", BUILDS)
def test_benchmark_recipe_builds_on_the_cpu(recipe):
    cfg = load(os.path.join(REPO, "configs", recipe))
    # One CPU process: no weights download, and BatchNorm for SyncBN.
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
                         "MODEL.RESNETS.NORM", "BN", "MODEL.SEM_SEG_HEAD.NORM", "BN"])
    model = build_model(cfg)
    assert model.sem_seg_head.predictor.out_channels == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert (model.memory_bank is not None) == cfg.MODEL.REGION_CONTRAST.ENABLED
    assert model.backbone.output_shape()["res5"].stride == 8
    if cfg.TEST.SLIDING_WINDOW.ENABLED:
        assert model.window_size == tuple(cfg.TEST.SLIDING_WINDOW.CROP_SIZE)
    # Whole-image evaluation (and any TTA scale) falls back to windows of the crop for images
    # that do not tile it.
    assert model.tile_size == tuple(cfg.INPUT.CROP.SIZE)


# --------------------------------------------------------------------------------------------
# Semantic FPN recipes (Detectron2's SemanticSegmentor and SemSegFPNHead)

FPN_NAME = re.compile(
    r"semantic_R_50_FPN_(?P<rc>region_contrast_)?(?P<data>[a-z0-9_]+)_(?P<iters>\d+)k_"
    r"bs(?P<batch>\d+)\.yaml"
)


def test_semantic_fpn_recipes_are_twins_that_differ_in_the_contrast_only():
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "*", "semantic_R_50_FPN_*.yaml")))
    assert paths
    for path in paths:
        m = FPN_NAME.fullmatch(os.path.basename(path))
        assert m, path
        if m["rc"]:
            continue
        slug, classes, train, test = BENCHMARKS[os.path.basename(os.path.dirname(path))]
        assert m["data"] == slug
        cfg = load(path)
        assert (cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.SEM_SEG_HEAD.NAME) == (
            "SemanticSegmentor", "SemSegFPNHead")
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == classes
        assert cfg.DATASETS.TRAIN == (train,) and cfg.DATASETS.TEST == (test,)
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH) == (
            int(m["iters"]) * 1000, int(m["batch"]))
        twin = load(path.replace(f"_{slug}_", f"_region_contrast_{slug}_"))
        rc = twin.MODEL.REGION_CONTRAST
        assert twin.MODEL.SEM_SEG_HEAD.NAME == "RegionContrastHead"
        assert rc.ENABLED and rc.HEAD_NAME == "SemSegFPNHead" and rc.PROJ_DIM == 0
        # The merged "things" class of the stuff-only maps stays out of the contrast.
        assert list(rc.EXCLUDED_CLASSES) == ([0] if slug == "coco_panoptic_stuff" else [])
        cfg.MODEL.SEM_SEG_HEAD.NAME = twin.MODEL.SEM_SEG_HEAD.NAME
        cfg.MODEL.REGION_CONTRAST = twin.MODEL.REGION_CONTRAST
        cfg.OUTPUT_DIR = twin.OUTPUT_DIR
        assert cfg == twin, path


def test_semantic_fpn_region_contrast_recipe_builds_on_the_cpu():
    from detectron2.modeling import SemanticSegmentor
    from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
    from region_contrast import find_region_contrast

    cfg = load(os.path.join(REPO, "configs", "COCO-Panoptic-Stuff",
                            "semantic_R_50_FPN_region_contrast_coco_panoptic_stuff_90k_bs16.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert type(model) is SemanticSegmentor and type(model.sem_seg_head) is SemSegFPNHead
    criterion = find_region_contrast(model)
    assert criterion.memory_bank.dim == cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == 128
    assert criterion.excluded_classes == (0,)
