"""RegionContrastSegmentor against Detectron2's own SemanticSegmentor and DeepLab heads."""
import copy

import pytest
import torch

from conftest import NUM_CLASSES, SIZE, build, make_batch, make_cfg, train_step
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import EventStorage
from region_contrast.modeling.criterion import labels_at


def baseline_cfg():
    """Detectron2's own SemanticSegmentor with the DeepLab project's DeepLabV3PlusHead."""
    cfg = make_cfg(enabled=False)
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV3PlusHead"
    return cfg


def test_disabled_is_the_detectron2_baseline():
    # The DeepLab heads' own classifier init; the DigitScenes recipes widen it (test below).
    cfg = make_cfg(enabled=False)
    cfg.MODEL.SEM_SEG_HEAD.PREDICTOR_INIT_STD = 0.001
    rc_model = build(cfg)
    d2_model = build(baseline_cfg())
    rc_state, d2_state = rc_model.state_dict(), d2_model.state_dict()
    assert list(rc_state) == list(d2_state)
    assert all(rc_state[k].shape == d2_state[k].shape for k in d2_state)
    assert sum(p.numel() for p in rc_model.parameters()) == sum(
        p.numel() for p in d2_model.parameters()
    )
    for k in d2_state:  # same seed, same initialisation order
        assert torch.equal(rc_state[k], d2_state[k]), k

    batch = make_batch()
    # Same dropout masks (ASPP) for both: the global generator is all that differs otherwise.
    torch.manual_seed(3)
    rc_losses, _ = train_step(rc_model, batch)
    torch.manual_seed(3)
    d2_losses, _ = train_step(d2_model, batch)
    assert rc_losses.keys() == d2_losses.keys() == {"loss_sem_seg"}
    torch.testing.assert_close(rc_losses["loss_sem_seg"], d2_losses["loss_sem_seg"])


def test_enabled_adds_only_projector_and_bank_and_eval_matches_baseline():
    d2_model = build(baseline_cfg(), seed=1)
    rc_model = build(make_cfg(), seed=2)
    extra = set(rc_model.state_dict()) - set(d2_model.state_dict())
    assert set(d2_model.state_dict()) <= set(rc_model.state_dict())
    assert extra and all(k.startswith("sem_seg_head.region_contrast.") for k in extra)

    # Fill the bank, then load the baseline's weights: evaluation must not see the difference.
    train_step(rc_model, make_batch(3))
    incompatible = rc_model.load_state_dict(d2_model.state_dict(), strict=False)
    assert set(incompatible.missing_keys) == extra and not incompatible.unexpected_keys
    bank_before = copy.deepcopy(rc_model.memory_bank.state_dict())

    d2_model.eval()
    rc_model.eval()
    batch = make_batch(4)
    with torch.no_grad():
        expected = d2_model(batch)
        got = rc_model(batch)
    for e, g in zip(expected, got):
        assert torch.equal(e["sem_seg"], g["sem_seg"])
    for k, v in rc_model.memory_bank.state_dict().items():
        assert torch.equal(v, bank_before[k]), f"evaluation touched the bank ({k})"


def test_rc_checkpoint_deploys_into_the_baseline(tmp_path):
    rc_model = build(make_cfg())
    train_step(rc_model, make_batch())
    DetectionCheckpointer(rc_model, save_dir=str(tmp_path)).save("model_rc")

    d2_model = build(baseline_cfg(), seed=5)
    # What a user does to deploy: the public load, which warns about keys it does not use.
    DetectionCheckpointer(d2_model).load(str(tmp_path / "model_rc.pth"))
    saved = torch.load(tmp_path / "model_rc.pth", map_location="cpu", weights_only=False)
    unused = set(saved["model"]) - set(d2_model.state_dict())
    assert unused and all(k.startswith("sem_seg_head.region_contrast.") for k in unused)
    for k, v in d2_model.state_dict().items():  # every baseline weight came from the file
        assert torch.equal(v, rc_model.state_dict()[k]), k


def test_bank_round_trips_through_detection_checkpointer(tmp_path):
    model = build(make_cfg())
    for it in range(3):
        train_step(model, make_batch(it), it)
    assert int(model.memory_bank.count.sum()) > 0
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")

    resumed = build(make_cfg(), seed=9)
    DetectionCheckpointer(resumed, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    for k, v in model.memory_bank.state_dict().items():
        assert torch.equal(v, resumed.memory_bank.state_dict()[k]), k


def test_training_step_logs_and_pushes_one_row_per_region():
    model = build(make_cfg())
    batch = make_batch()
    losses, storage = train_step(model, batch)
    assert set(losses) == {"loss_sem_seg", "loss_contrast"}
    # First step: the bank is empty, so no anchor has positives; the loss is a zero with a graph.
    assert float(losses["loss_contrast"]) == 0.0 and losses["loss_contrast"].requires_grad
    # One row per (image, class) present at the feature resolution, ignore excluded.
    labels = torch.stack([x["sem_seg"] for x in batch])[:, ::4, ::4]
    expected = sum(len(set(l[l != 255].tolist())) for l in labels)
    assert int(model.memory_bank.count.sum()) == expected

    losses, storage = train_step(model, make_batch(1), it=1)
    assert float(losses["loss_contrast"]) > 0
    for key in ("region_contrast_bank_fill", "region_contrast_pos_cos", "region_contrast_neg_cos"):
        assert key in storage.latest(), key
    grads = [p.grad for p in model.criterion.projector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("size", [(16, 16), (16, 8), (13, 11)])
def test_labels_are_nearest_downsampled_ground_truth(size):
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, NUM_CLASSES, (2, SIZE, SIZE), generator=g)
    targets[:, :5] = 255
    expected = torch.nn.functional.interpolate(targets[:, None].float(), size=size,
                                               mode="nearest")[:, 0].long()
    assert torch.equal(labels_at(targets, size), expected)


@pytest.mark.parametrize(
    "options",
    [
        dict(ANCHORS="pixel", PIXELS_PER_REGION=4),
        dict(REGION_SOURCE="pred"),
        dict(DYNAMIC_SAMPLES=2, DYNAMIC_FRACTION=0.5),
        dict(SAMPLES_PER_CLASS=2),
        dict(MEMORY_DTYPE="float16"),
        dict(MEMORY_DTYPE="bfloat16"),
        dict(PROJ_DIM=0),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_variants_train(options):
    model = build(make_cfg(**options))
    for it in range(3):
        losses, _ = train_step(model, make_batch(it), it)
        assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_contrast"]) > 0
    features, _ = model.memory_bank.snapshot()
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    if options.get("DYNAMIC_SAMPLES"):
        # Each region pushes its centre and DYNAMIC_SAMPLES subset means.
        assert int(model.memory_bank.count.sum()) > 0


def test_dynamic_samples_push_extra_rows():
    plain, dynamic = build(make_cfg()), build(make_cfg(DYNAMIC_SAMPLES=2, MEMORY_SIZE=100))
    plain.criterion.memory_bank = type(plain.memory_bank)(NUM_CLASSES, 100, 16)
    batch = make_batch()
    train_step(plain, batch)
    train_step(dynamic, batch)
    assert int(dynamic.memory_bank.count.sum()) == 3 * int(plain.memory_bank.count.sum())


def test_warmup_has_zero_contrast_weight_but_fills_the_bank():
    model = build(make_cfg(WARMUP_ITERS=5))
    for it in range(3):
        losses, _ = train_step(model, make_batch(it), it)
        assert float(losses["loss_contrast"]) == 0.0
    assert int(model.memory_bank.count.sum()) > 0
    losses, _ = train_step(model, make_batch(7), it=5)
    assert float(losses["loss_contrast"]) > 0


def test_all_ignore_batch_trains():
    model = build(make_cfg())
    losses, _ = train_step(model, make_batch(all_ignore=True))
    assert int(model.memory_bank.count.sum()) == 0
    assert float(losses["loss_contrast"]) == 0.0


def test_non_finite_loss_pushes_nothing():
    model = build(make_cfg())
    batch = make_batch()
    batch[0]["image"][:] = float("nan")
    model.train()
    with EventStorage(0):
        losses = model(batch)
    assert not torch.isfinite(sum(losses.values()))
    assert int(model.memory_bank.count.sum()) == 0


def test_contrast_math_stays_float32_under_autocast():
    model = build(make_cfg())
    train_step(model, make_batch(0))
    model.train()
    with EventStorage(1), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(make_batch(1))
    assert losses["loss_contrast"].dtype == torch.float32
    assert float(losses["loss_contrast"]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_equals_the_cpu_step():
    """The one code path on the GPU: the same losses, gradients and bank as on the CPU."""
    cfg = make_cfg()
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT = 0.0  # no random masks: the devices' generators differ
    cpu = build(cfg)
    cuda = copy.deepcopy(cpu).cuda()
    # TF32 would round the GPU's convolutions and matmuls to 10 mantissa bits.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _compare_cpu_and_cuda_steps(cpu, cuda)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _compare_cpu_and_cuda_steps(cpu, cuda):
    for it, batch in enumerate((make_batch(0), make_batch(1))):
        for model in (cpu, cuda):
            model.zero_grad(set_to_none=True)
        torch.manual_seed(it)
        cpu_losses, _ = train_step(cpu, batch, it)
        torch.manual_seed(it)
        cuda_losses, _ = train_step(cuda, batch, it)
        for key, value in cpu_losses.items():
            torch.testing.assert_close(cuda_losses[key].cpu(), value, rtol=1e-3, atol=1e-4)
    for (name, p), q in zip(cpu.criterion.named_parameters(), cuda.criterion.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-4, msg=name)
    for key, value in cpu.memory_bank.state_dict().items():
        torch.testing.assert_close(cuda.memory_bank.state_dict()[key].cpu(), value,
                                   rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize(
    "key,value",
    [
        ("TEMPERATURE", 0.0),
        ("MEMORY_SIZE", 0),
        ("PROJ_DIM", -1),
        ("ANCHORS", "patch"),
        ("REGION_SOURCE", "oracle"),
        ("DYNAMIC_FRACTION", 1.5),
        ("DYNAMIC_FRACTION", 0.0),
        ("MEMORY_DTYPE", "int8"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"MODEL.REGION_CONTRAST.{key}"):
        build(make_cfg(**{key: value}))


@pytest.mark.parametrize("head", ["RegionContrastDeepLabV3PlusHead", "RegionContrastDeepLabV3Head"])
def test_predictor_init_std_redraws_only_the_classifier(head):
    def head_cfg(std):
        cfg = make_cfg(enabled=False)
        cfg.MODEL.SEM_SEG_HEAD.NAME = head
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 64  # enough weights for a sample std
        if head == "RegionContrastDeepLabV3Head":
            cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
        cfg.MODEL.SEM_SEG_HEAD.PREDICTOR_INIT_STD = std
        return cfg

    default = build(head_cfg(0.001)).state_dict()
    wide = build(head_cfg(0.1)).state_dict()
    assert list(default) == list(wide)
    # Drawn after everything else, so every other tensor is the DeepLab initialisation.
    for k in default:
        if not k.startswith("sem_seg_head.predictor."):
            assert torch.equal(default[k], wide[k]), k
    assert abs(float(default["sem_seg_head.predictor.weight"].std()) - 0.001) < 2e-4
    assert abs(float(wide["sem_seg_head.predictor.weight"].std()) - 0.1) < 0.02
    assert torch.count_nonzero(wide["sem_seg_head.predictor.bias"]) == 0

    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.PREDICTOR_INIT_STD"):
        build(head_cfg(0.0))


def v3_head_cfg():
    """make_cfg with the DeepLabV3 head on res5 instead of DeepLabV3+."""
    cfg = make_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NAME = "RegionContrastDeepLabV3Head"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 32
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    return cfg


def test_deeplab_v3_head_variant_trains():
    model = build(v3_head_cfg())
    for it in range(2):
        losses, _ = train_step(model, make_batch(it), it)
    assert float(losses["loss_contrast"]) > 0
