"""
Region contrast around any semantic head (docs/method.md, section 8): Detectron2's Semantic FPN
and DeepLab heads, and a head registered here, as a user registers theirs.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import NUM_CLASSES, SIZE, build, make_batch, make_cfg, make_fpn_cfg, train_step
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY, SemanticSegmentor
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from region_contrast import find_region_contrast
from region_contrast.engine import Trainer


def plain_fpn_cfg():
    """The same Semantic FPN with Detectron2's head named directly: the user's baseline."""
    cfg = make_fpn_cfg(enabled=False)
    cfg.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
    return cfg


def backbone_features(model, batch):
    """The backbone's features of a batch of equal, divisible sizes, normalised by hand."""
    images = torch.stack([(x["image"] - model.pixel_mean) / model.pixel_std for x in batch])
    return model.backbone(images)


def eval_outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return [o["sem_seg"] for o in model(batch)]


def test_disabled_is_the_plain_semantic_fpn():
    wrapped, plain = build(make_fpn_cfg(enabled=False)), build(plain_fpn_cfg())
    assert type(wrapped) is SemanticSegmentor and type(wrapped.sem_seg_head) is SemSegFPNHead
    assert find_region_contrast(wrapped) is None
    tree = wrapped.state_dict()
    assert list(tree) == list(plain.state_dict())
    for key, value in plain.state_dict().items():  # same seed, same initialisation
        assert torch.equal(tree[key], value), key
    losses, _ = train_step(wrapped, make_batch())
    expected, _ = train_step(plain, make_batch())
    assert losses.keys() == expected.keys() == {"loss_sem_seg"}
    assert torch.equal(losses["loss_sem_seg"], expected["loss_sem_seg"])
    for a, b in zip(eval_outputs(wrapped, make_batch(1)), eval_outputs(plain, make_batch(1))):
        assert torch.equal(a, b)


def test_semantic_fpn_contrast_equals_the_criterion_on_the_classifier_input():
    model = build(make_fpn_cfg())
    head = model.sem_seg_head
    assert type(model) is SemanticSegmentor and isinstance(head, SemSegFPNHead)
    criterion = find_region_contrast(model)
    train_step(model, make_batch(1))  # the bank holds a batch: the loss is not trivially zero
    reference = copy.deepcopy(criterion)

    batch = make_batch(2)
    losses, storage = train_step(model, batch)
    # Independently: Semantic FPN's classifier input is the sum of its scale heads' outputs.
    with torch.no_grad():
        features = backbone_features(model, batch)
        summed = sum(scale(features[f]) for f, scale in zip(head.in_features, head.scale_heads))
        targets = torch.stack([x["sem_seg"] for x in batch])
        expected = reference(summed, targets)
    assert set(losses) == {"loss_sem_seg", "loss_contrast"}
    assert float(losses["loss_contrast"].detach()) > 0
    torch.testing.assert_close(losses["loss_contrast"].detach(), expected.loss)
    # The step's regions entered the bank, exactly those the reference computed.
    reference.update(expected)
    for key, value in reference.memory_bank.state_dict().items():
        assert torch.equal(criterion.memory_bank.state_dict()[key], value), key
    assert "region_contrast_pos_cos" in storage.latest()
    # The contrast's gradient reaches the head and the backbone.
    assert head.scale_heads[0][0].weight.grad is not None


def test_enabled_evaluates_as_the_plain_model_and_deploys_into_it(tmp_path):
    model = build(make_fpn_cfg(), seed=1)
    train_step(model, make_batch(3))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_rc")
    bank = copy.deepcopy(find_region_contrast(model).memory_bank.state_dict())

    plain = build(plain_fpn_cfg(), seed=2)
    DetectionCheckpointer(plain).load(str(tmp_path / "model_rc.pth"))
    saved = torch.load(tmp_path / "model_rc.pth", map_location="cpu", weights_only=False)
    unused = set(saved["model"]) - set(plain.state_dict())
    assert unused and all(k.startswith("sem_seg_head.region_contrast.") for k in unused)
    batch = make_batch(4)
    for a, b in zip(eval_outputs(model, batch), eval_outputs(plain, batch)):
        assert torch.equal(a, b)
    for key, value in find_region_contrast(model).memory_bank.state_dict().items():
        assert torch.equal(value, bank[key]), f"evaluation touched the bank ({key})"


@pytest.mark.parametrize("head_name", ["DeepLabV3PlusHead", "DeepLabV3Head"])
def test_detectron2_deeplab_heads_through_region_contrast_head(head_name):
    cfg = make_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "RegionContrastHead"
    cfg.MODEL.REGION_CONTRAST.HEAD_NAME = head_name
    if head_name == "DeepLabV3Head":
        cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
        cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 32
    model = build(cfg)
    assert type(model.sem_seg_head).__name__ == head_name
    criterion = find_region_contrast(model)
    # The bank holds the classifier's input width, as the head's predictor reads it.
    assert criterion.memory_bank.dim == cfg.MODEL.REGION_CONTRAST.PROJ_DIM
    assert criterion.projector[0].in_features == model.sem_seg_head.predictor.in_channels
    losses, _ = train_step(model, make_batch())
    assert {"loss_sem_seg", "loss_contrast"} <= set(losses)
    assert int(criterion.memory_bank.count.sum()) > 0


def test_project_recipes_checkpoint_layout_still_loads(tmp_path):
    """A checkpoint of the earlier layout (contrast at ``criterion.*``) loads, bank included."""
    model = build(make_cfg())
    train_step(model, make_batch())
    state = {k.replace("sem_seg_head.region_contrast.", "criterion."): v
             for k, v in model.state_dict().items()}
    assert any(k.startswith("criterion.memory_bank.") for k in state)
    torch.save({"model": state}, tmp_path / "old.pth")
    loaded = build(make_cfg(), seed=7)
    DetectionCheckpointer(loaded).load(str(tmp_path / "old.pth"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_excluded_classes_never_enter_the_bank():
    model = build(make_fpn_cfg(EXCLUDED_CLASSES=[0, 3]))
    for it in range(3):
        train_step(model, make_batch(it), it)
    bank = find_region_contrast(model).memory_bank
    assert bank.count[0] == 0 and bank.count[3] == 0
    assert int(bank.count.sum()) > 0


def test_enabled_without_a_contrast_head_fails_naming_the_keys():
    cfg = plain_fpn_cfg()
    cfg.MODEL.REGION_CONTRAST.ENABLED = True
    with pytest.raises(ValueError, match="RegionContrastHead.*HEAD_NAME"):
        Trainer.build_model(cfg)


def test_unknown_head_name_lists_the_registered_heads():
    with pytest.raises(ValueError, match="HEAD_NAME = 'NoSuchHead'.*SemSegFPNHead"):
        build(make_fpn_cfg(HEAD_NAME="NoSuchHead"))


# Heads a user registers in their own code.
class _UserHead(nn.Module):
    """A user's head: a conv tower and a classifier named ``classify``."""

    def __init__(self, cfg, input_shape, *, calls=1, flat=False):
        super().__init__()
        self.in_feature = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES[0]
        self.stride = input_shape[self.in_feature].stride
        width = input_shape[self.in_feature].channels
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.tower = nn.Conv2d(width, 24, 3, padding=1)
        self.act = nn.ReLU()
        # flat: the classifier reads (N, C, H*W), not a map.
        self.classify = (nn.Conv1d if flat else nn.Conv2d)(24, num_classes, 1)
        self.spare = nn.Conv2d(24, 24, 1)  # never runs
        self.calls, self.flat = calls, flat
        self.ignore_value = 255  # SemanticSegmentor pads the targets with it

    def forward(self, features, targets=None):
        x = self.act(self.tower(features[self.in_feature]))
        for _ in range(self.calls):
            if self.flat:
                logits = self.classify(x.flatten(2)).view(x.shape[0], -1, *x.shape[2:])
            else:
                logits = self.classify(x)
        logits = F.interpolate(logits, scale_factor=self.stride, mode="bilinear")
        if self.training:
            return None, {"loss_sem_seg": F.cross_entropy(logits, targets, ignore_index=255)}
        return logits, {}


@SEM_SEG_HEADS_REGISTRY.register()
def TestsUserHead(cfg, input_shape):
    return _UserHead(cfg, input_shape)


@SEM_SEG_HEADS_REGISTRY.register()
def TestsUserHeadTwice(cfg, input_shape):
    return _UserHead(cfg, input_shape, calls=2)


@SEM_SEG_HEADS_REGISTRY.register()
def TestsUserHeadFlat(cfg, input_shape):
    return _UserHead(cfg, input_shape, flat=True)


def user_cfg(head_name, feature_module="classify"):
    cfg = make_fpn_cfg(HEAD_NAME=head_name, FEATURE_MODULE=feature_module)
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p3"]
    return cfg


def test_a_users_own_head_with_its_own_classifier_name():
    model = build(user_cfg("TestsUserHead"))
    assert isinstance(model.sem_seg_head, _UserHead)
    criterion = find_region_contrast(model)
    assert criterion.memory_bank.dim == 24
    reference = copy.deepcopy(criterion)
    batch = make_batch()
    losses, _ = train_step(model, batch)
    with torch.no_grad():
        tower = F.relu(model.sem_seg_head.tower(backbone_features(model, batch)["p3"]))
        expected = reference(tower, torch.stack([x["sem_seg"] for x in batch]))
    torch.testing.assert_close(losses["loss_contrast"].detach(), expected.loss)
    assert int(criterion.memory_bank.count.sum()) == expected.bank_classes.numel() > 0


@pytest.mark.parametrize("head_name, module, message", [
    ("TestsUserHeadTwice", "classify", "FEATURE_MODULE = 'classify' ran 2 times"),
    ("TestsUserHead", "spare", "FEATURE_MODULE = 'spare' ran 0 times"),
    ("TestsUserHeadFlat", "classify", r"FEATURE_MODULE = 'classify' .* not an \(N, C, H, W\)"),
])
def test_unreadable_features_fail_at_the_first_step_naming_the_key(head_name, module, message):
    model = build(user_cfg(head_name, module))
    with pytest.raises(RuntimeError, match=message):
        train_step(model, make_batch())
    assert int(find_region_contrast(model).memory_bank.count.sum()) == 0
    # Evaluation never reads them: the plain head's outputs.
    assert eval_outputs(model, make_batch())[0].shape == (NUM_CLASSES, SIZE, SIZE)


@pytest.mark.parametrize("module, message", [
    ("nope", "FEATURE_MODULE = 'nope'.*no such submodule.*'classify'"),
    ("act", "FEATURE_MODULE = 'act' is a ReLU without an integer `in_channels`"),
])
def test_bad_feature_module_is_rejected_at_build(module, message):
    with pytest.raises(ValueError, match=message):
        build(user_cfg("TestsUserHead", module))


def panoptic_batch(seed=0):
    """make_batch's images and stuff maps, with two boxes per image as its instances."""
    from detectron2.structures import BitMasks, Boxes, Instances

    batch = make_batch(seed)
    for x in batch:
        instances = Instances((SIZE, SIZE))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 36.0], [20.0, 16.0, 60.0, 50.0]]))
        instances.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
        masks[0, 4:36, 4:30] = True
        masks[1, 16:50, 20:60] = True
        instances.gt_masks = BitMasks(masks)
        x["instances"] = instances
    return batch


def test_panoptic_fpn_trains_with_contrast_on_its_semantic_branch_without_things():
    from detectron2.modeling import PanopticFPN

    cfg = make_fpn_cfg(EXCLUDED_CLASSES=[0])
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "PanopticFPN", "MODEL.MASK_ON", "True",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
        "MODEL.RPN.IN_FEATURES", "['p2', 'p3', 'p4', 'p5', 'p6']",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "MODEL.ROI_HEADS.IN_FEATURES", "['p2', 'p3', 'p4', 'p5']",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_FC", "2",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "7",
        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "14",
    ])
    model = build(cfg)
    assert type(model) is PanopticFPN and type(model.sem_seg_head) is SemSegFPNHead
    for it in range(2):
        losses, _ = train_step(model, panoptic_batch(it), it)
    assert {"loss_sem_seg", "loss_contrast", "loss_cls", "loss_box_reg", "loss_mask",
            "loss_rpn_cls"} <= set(losses)
    bank = find_region_contrast(model).memory_bank
    assert int(bank.count[0]) == 0 and int(bank.count.sum()) > 0
    # The plain PanopticFPN takes the trained weights; only the contrast's keys are left over.
    cfg.MODEL.REGION_CONTRAST.ENABLED = False
    plain = build(cfg, seed=3)
    incompatible = plain.load_state_dict(model.state_dict(), strict=False)
    assert not incompatible.missing_keys
    assert incompatible.unexpected_keys and all(
        k.startswith("sem_seg_head.region_contrast.") for k in incompatible.unexpected_keys)
