"""
Degenerate batches train without error, through the model and through the Trainer's loader.

Each scenario runs a few optimizer steps and checks that every loss stays finite, the weights stay
finite and the bank holds only finite rows of the classes that were seen.
"""
import pytest
import torch

from conftest import (
    build,
    make_batch,
    make_cfg,
    parse_args,
    tiny_digit_scenes,
    train_step,
    unregister,
)
from region_contrast.engine import main

SIZE = 32  # images and crop: small and fast; the ASPP pooling kernel is then 1x1
STEPS = 3

VARIANTS = {
    "region": {},
    # Every random path of the step: pixel anchors, dynamic subsets, sampled bank slots.
    "pixel+dynamic+sampled": dict(
        ANCHORS="pixel", PIXELS_PER_REGION=4, DYNAMIC_SAMPLES=1, SAMPLES_PER_CLASS=2
    ),
}

SCENARIOS = {
    # name: (batch arguments per step, classes expected in the bank afterwards)
    "all_ignore": ([dict(all_ignore=True)] * STEPS, set()),
    "ignore_between": ([dict(), dict(all_ignore=True), dict()], {0, 1, 2, 3, 4}),
    "single_class": ([dict(classes=[2])] * STEPS, {2}),
    "classes_never_seen": ([dict(classes=[0, 3])] * STEPS, {0, 3}),
    # 64 pixels: BatchNorm needs more than one value per channel, and one 32-pixel image has a
    # single 1x1 map at stride 32 (a BatchNorm limit, not the project's).
    "batch_size_1": ([dict(n=1, size=64)] * STEPS, None),
    "batch_size_1_single_class": ([dict(n=1, size=64, classes=[4])] * STEPS, {4}),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every case here runs on one thread (the shared fixture)."""


CASES = [(s, v, "cross_entropy") for s in SCENARIOS for v in VARIANTS] + [
    (s, "region", "hard_pixel_mining") for s in SCENARIOS  # the recipes' loss
]


@pytest.mark.parametrize(
    "scenario,variant,loss_type", [pytest.param(*c, id="-".join(c)) for c in CASES]
)
def test_degenerate_batches_train(scenario, variant, loss_type):
    cfg = make_cfg(crop=SIZE, **VARIANTS[variant])
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = loss_type
    model = build(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps, expected_classes = SCENARIOS[scenario]
    for it, batch_args in enumerate(steps):
        optimizer.zero_grad()
        losses, _ = train_step(model, make_batch(seed=it, **{"size": SIZE, **batch_args}), it)
        for name, value in losses.items():
            assert torch.isfinite(value), f"step {it}: {name} = {value}"
        if batch_args.get("all_ignore"):
            assert float(losses["loss_sem_seg"].detach()) == 0.0
            assert float(losses["loss_contrast"].detach()) == 0.0
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    features, classes = model.memory_bank.snapshot()
    assert torch.isfinite(features).all()
    if expected_classes is not None:
        assert set(classes.tolist()) == expected_classes


def test_all_ignore_batch_keeps_every_parameter_in_the_graph():
    # DDP needs a gradient (possibly zero) for every parameter, also from an all-ignore batch.
    model = build(make_cfg(crop=SIZE))
    train_step(model, make_batch(size=SIZE, all_ignore=True))
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


# --------------------------------------------------------------------------------------------
# Images smaller than the crop, through the Trainer's data loader
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("small_scenes"))
    names = tiny_digit_scenes(root, "small_scenes", num_train=4, num_val=2, size=48)
    yield names
    unregister(names)


def small_opts(output_dir):
    return [
        "DATASETS.TRAIN", "('small_scenes_train',)",
        "DATASETS.TEST", "('small_scenes_val',)",
        "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32",
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "MODEL.REGION_CONTRAST.ENABLED", "True",
        "MODEL.REGION_CONTRAST.PROJ_DIM", "16",
        "MODEL.REGION_CONTRAST.MEMORY_SIZE", "4",
        # 48-pixel scenes resized to 32: smaller than the 64-pixel crop. A 32-pixel batch has a
        # 1x1 map at stride 32, where DeepLab's 2x2 ASPP pooling (64 / 32) fails.
        "INPUT.MIN_SIZE_TRAIN", "(32,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.CROP.SIZE", "(64, 64)",
        "INPUT.MIN_SIZE_TEST", "48",
        "INPUT.MAX_SIZE_TEST", "48",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "3",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0",
        "SEED", "3",
        "OUTPUT_DIR", str(output_dir),
    ]


def test_samples_smaller_than_the_crop_are_padded(small_scenes, tmp_path):
    from region_contrast.engine import Trainer, setup

    cfg = setup(parse_args(*small_opts(tmp_path)))
    loader = iter(Trainer.build_train_loader(cfg))
    mean = torch.tensor([round(v) for v in cfg.MODEL.PIXEL_MEAN], dtype=torch.uint8)
    for _ in range(2):
        for sample in next(loader):
            image, label = sample["image"], sample["sem_seg"]
            assert image.shape == (3, 64, 64) and label.shape == (64, 64)
            # The original content sits top-left; the rest is ignore / the pixel mean.
            rows = (label != 255).any(dim=1).nonzero().max().item() + 1
            cols = (label != 255).any(dim=0).nonzero().max().item() + 1
            assert rows <= 32 and cols <= 32
            assert (label[32:] == 255).all() and (label[:, 32:] == 255).all()
            assert (image[:, 32:] == mean.view(3, 1, 1)).all()
            assert (image[:, :, 32:] == mean.view(3, 1, 1)).all()


def test_training_on_images_smaller_than_the_crop(small_scenes, tmp_path):
    results = main(parse_args(*small_opts(tmp_path)))
    # Evaluated at 48 pixels: every class scored (or NaN where absent), the file written.
    metrics = results["sem_seg"]
    assert 0 <= metrics["mIoU"] <= 100 and 0 < metrics["pACC"] <= 100
    assert sum(k.startswith("IoU-") for k in metrics) == 11
    evaluation = tmp_path / "inference" / "small_scenes_val" / "sem_seg_evaluation.pth"
    assert torch.load(evaluation, weights_only=False)["mIoU"] == metrics["mIoU"]
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert int(state["model"]["sem_seg_head.region_contrast.memory_bank.count"].sum()) > 0
