"""
After planning, the contrast (pooling, projection, loss, backward) reads no device value on the
host, so on a GPU its kernels queue behind the network's instead of waiting for them; and the
meta-architecture plans before the backbone runs.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from region_contrast.loss import plan_region_contrast, region_contrast_loss
from region_contrast.memory_bank import RegionMemoryBank
from region_contrast.projection import build_projection_head
from region_contrast.regions import find_regions, pool_regions

from detectron2.utils.events import EventStorage
from test_meta_arch import build, make_batch, make_cfg, train_step, v3_head_cfg

NUM_CLASSES = 6


def planned_contrast(device, samples_per_class):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (3, 12, 12), generator=g)
    labels[torch.rand(3, 12, 12, generator=g) < 0.1] = 255
    labels[0, :4] = 255
    features = torch.randn(3, 8, 12, 12, generator=g).to(device).requires_grad_()
    bank = RegionMemoryBank(NUM_CLASSES, 10, 8).to(device)
    rows = F.normalize(torch.randn(40, 8, generator=g), dim=1).to(device)
    # Class 5 never enters the bank: its anchors have no positives.
    bank.push(rows, (torch.arange(40) % (NUM_CLASSES - 1)).to(device))
    torch.manual_seed(0)
    projector = build_projection_head(8, 8).to(device)

    regions = find_regions(labels.to(device), NUM_CLASSES)
    memory, memory_classes = bank.sample(samples_per_class, copy=False)
    plan = plan_region_contrast(regions.classes, memory, memory_classes)

    def run():
        centers = pool_regions(features, regions)
        anchors = F.normalize(projector(centers), dim=1)
        loss, stats = region_contrast_loss(anchors, regions.classes, memory, memory_classes, 0.1,
                                           plan=plan, return_stats=True)
        loss.backward()
        return loss, stats

    def unplanned():
        centers = pool_regions(features, regions)
        anchors = F.normalize(projector(centers), dim=1)
        return region_contrast_loss(anchors, regions.classes, memory, memory_classes, 0.1)

    return run, unplanned


@contextlib.contextmanager
def watched_host_reads(monkeypatch, on_read):
    """Inside the block, every Python-level host read of a tensor value calls ``on_read(name)``
    first (which may raise to refuse it)."""
    with monkeypatch.context() as m:
        for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
            original = getattr(torch.Tensor, name)

            def watched(self, *a, _original=original, _name=name, **k):
                on_read(_name)
                return _original(self, *a, **k)

            m.setattr(torch.Tensor, name, watched)
        yield


def no_host_reads(monkeypatch):
    """Python-level host reads of tensor values raise inside the block."""
    def refuse(_name):
        raise AssertionError("a tensor value was read on the host")

    return watched_host_reads(monkeypatch, refuse)


@pytest.mark.parametrize("samples_per_class", [0, 3])
def test_planned_contrast_reads_nothing_on_the_host(monkeypatch, samples_per_class):
    run, unplanned = planned_contrast("cpu", samples_per_class)
    with no_host_reads(monkeypatch):
        loss, _ = run()
    # The planned loss is the unplanned one, and the check above does catch a host read.
    torch.testing.assert_close(loss, unplanned(), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="host"), no_host_reads(monkeypatch):
        unplanned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("samples_per_class", [0, 3])
def test_planned_contrast_never_synchronizes_cuda(samples_per_class):
    run, unplanned = planned_contrast("cuda", samples_per_class)
    run()  # first call: lazy CUDA initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(loss, unplanned(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head", ["v3plus", "v3"])
def test_training_step_plans_once_before_the_backbone(monkeypatch, head):
    model = build(v3_head_cfg() if head == "v3" else make_cfg())
    events = []
    prepare, backbone_forward = model._prepare, model.backbone.forward
    monkeypatch.setattr(model, "_prepare",
                        lambda *a, **k: events.append("prepare") or prepare(*a, **k))
    monkeypatch.setattr(model.backbone, "forward",
                        lambda *a, **k: events.append("backbone") or backbone_forward(*a, **k))
    for it in range(2):  # the second step has a bank to contrast with
        losses, _ = train_step(model, make_batch(it), it=200 + it)
    # Planned from the labels at the embedding's resolution (the head's stride), so the contrast
    # did not have to plan again after the forward.
    assert events == ["prepare", "backbone"] * 2
    assert float(losses["loss_contrast"]) > 0


def _meta_arch_contrast_inputs(device):
    from detectron2.structures import ImageList

    cfg = make_cfg()
    cfg.MODEL.DEVICE = device
    model = build(cfg)
    model.train()
    for it in range(2):  # fill the bank a little
        train_step(model, make_batch(it), it=200 + it)
    batch = make_batch(5)
    images = ImageList.from_tensors(
        [(x["image"].to(device) - model.pixel_mean) / model.pixel_std for x in batch],
        model.backbone.size_divisibility).tensor
    targets = ImageList.from_tensors([x["sem_seg"].to(device) for x in batch],
                                     model.backbone.size_divisibility, 255).tensor
    logits, embedding = model.sem_seg_head.forward_features(model.backbone(images))
    prepared = model._prepare(targets, embedding.shape[-2:])
    return model, (embedding, logits, targets, prepared)


def test_meta_arch_contrast_after_preparation_reads_nothing_on_the_host(monkeypatch):
    from detectron2.utils.events import EventStorage

    model, inputs = _meta_arch_contrast_inputs("cpu")
    with EventStorage(300), no_host_reads(monkeypatch):
        loss, rows, classes, stats = model._contrast(*inputs)
        loss.backward()
    assert float(loss) > 0 and rows.shape[0] == classes.shape[0] > 0
    assert set(stats) >= {"pos_cos", "neg_cos"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_meta_arch_contrast_after_preparation_never_synchronizes_cuda():
    from detectron2.utils.events import EventStorage

    model, inputs = _meta_arch_contrast_inputs("cuda")
    torch.cuda.synchronize()
    with EventStorage(300):
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _, _, _ = model._contrast(*inputs)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert float(loss) > 0


def test_training_step_reads_the_device_four_times(monkeypatch):
    """
    Before the backbone: the regions' counts and whether the bank is full. After the forward:
    the head's check for a batch without labelled pixels, then one read of the statistics and
    the finiteness checks, which the bank's push reuses instead of reading the rows again.
    (On a GPU each read waits for everything queued before it.)
    """
    model = build(make_cfg())
    for it in range(2):
        train_step(model, make_batch(it), it=200 + it)
    reads = []
    model.train()
    with EventStorage(300), watched_host_reads(monkeypatch, reads.append):
        model(make_batch(3))
    assert reads == ["tolist", "__bool__", "__bool__", "tolist"], reads
