"""
The fixed-shape contrast that CUDA graphs replay (region_contrast.graphed_contrast) against the
eager contrast: the same loss, statistics, gradients and bank rows, on the CPU (where it runs
without graphs) and, on a CUDA machine, captured and replayed over a real training run.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from detectron2.utils.events import EventStorage
from region_contrast.loss import plan_padded_contrast, region_contrast_loss
from region_contrast.memory_bank import RegionMemoryBank
from region_contrast.regions import find_regions, pool_regions
from test_meta_arch import NUM_CLASSES, build, make_batch, make_cfg, train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def partly_filled_bank(num_classes=6, size=5, dim=8, dtype=torch.float64, seed=0):
    """Class 0 full and wrapped, 1 partly filled, 2 one row, 3 full, 4 and 5 empty."""
    g = torch.Generator().manual_seed(seed)
    bank = RegionMemoryBank(num_classes, size, dim, dtype=dtype)
    classes = torch.tensor([0] * 7 + [1] * 3 + [2] + [3] * 5)
    bank.push(F.normalize(torch.randn(classes.numel(), dim, generator=g, dtype=dtype), dim=1),
              classes)
    return bank


@pytest.mark.parametrize("per_class", [0, 3])
def test_padded_rows_are_the_sample_plus_a_mask(per_class):
    bank = partly_filled_bank()
    rows, filled = bank.padded_rows(per_class, generator=torch.Generator().manual_seed(4))
    slots = bank.size if per_class == 0 else per_class
    assert rows.shape == (bank.num_classes * slots, bank.dim) and filled.shape == (6, slots)
    # Each class's filled rows come first.
    assert torch.equal(filled, torch.arange(slots) < filled.sum(dim=1, keepdim=True))
    sample, classes = bank.sample(per_class, generator=torch.Generator().manual_seed(4))
    assert torch.equal(rows[filled.view(-1)], sample)
    assert torch.equal(torch.arange(6).repeat_interleave(slots)[filled.view(-1)], classes)


@pytest.mark.parametrize("per_class", [0, 3])
@pytest.mark.parametrize("empty_bank", [False, True])
def test_padded_plan_is_the_compact_loss(per_class, empty_bank):
    """Padding anchors (garbage rows here) and unfilled slots change nothing."""
    bank = RegionMemoryBank(6, 5, 8, dtype=torch.float64) if empty_bank else partly_filled_bank()
    g = torch.Generator().manual_seed(1)
    anchors = F.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=1)
    # Classes 4 and 5 have no bank rows: those anchors are not valid.
    classes = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3, 1, 2, 5, 0])
    valid = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)

    memory, filled = bank.padded_rows(per_class, generator=torch.Generator().manual_seed(7))
    grid = torch.arange(6).repeat_interleave(filled.shape[1])
    padded = anchors.clone().requires_grad_()
    loss, stats = region_contrast_loss(
        padded, classes, memory, grid, 0.1, return_stats=True,
        plan=plan_padded_contrast(classes, valid, memory, filled))
    loss.backward()

    compact = anchors[valid].clone().requires_grad_()
    sample, sample_classes = bank.sample(per_class, generator=torch.Generator().manual_seed(7))
    expected, expected_stats = region_contrast_loss(compact, classes[valid], sample,
                                                    sample_classes, 0.1, return_stats=True)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for key in ("pos_cos", "neg_cos", "num_valid"):
        torch.testing.assert_close(stats[key], expected_stats[key], rtol=1e-12, atol=1e-12,
                                   equal_nan=True)
    torch.testing.assert_close(padded.grad[valid], compact.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(padded.grad[~valid], torch.zeros_like(padded.grad[~valid]))
    if not empty_bank:
        assert float(expected.detach()) > 0 and compact.grad.abs().sum() > 0


def test_rounded_widths_pool_the_same_regions():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (3, 9, 9), generator=g)
    labels[1] = 255
    labels[2] = torch.randint(0, 3, (9, 9), generator=g)
    features = torch.randn(3, 4, 9, 9, generator=g, dtype=torch.float64)
    exact = find_regions(labels, 11)
    rounded = find_regions(labels, 11, round_width=True)
    assert exact.width == 11 and rounded.width == 11  # 11 classes in image 0: capped at C
    assert find_regions(labels[2:], 11, round_width=True).width == 4
    assert find_regions(labels[1:2], 11, round_width=True).width == 1
    assert find_regions(labels[2:], 3, round_width=True).width == 3
    for field in ("region_id", "classes", "image_index", "size"):
        assert torch.equal(getattr(exact, field), getattr(rounded, field))
    sub = find_regions(labels[1:], 11, round_width=True)
    assert sub.width == 4
    torch.testing.assert_close(pool_regions(features[1:], sub),
                               pool_regions(features[1:], find_regions(labels[1:], 11)),
                               rtol=1e-14, atol=1e-15)


def _filled_model(cfg=None, steps=3):
    model = build(cfg or make_cfg())
    for it in range(steps):
        train_step(model, make_batch(it), it=200 + it)
    return model


def _contrast_inputs(model, batch):
    from detectron2.structures import ImageList

    device = model.device
    images = ImageList.from_tensors(
        [(x["image"].to(device) - model.pixel_mean) / model.pixel_std for x in batch],
        model.backbone.size_divisibility).tensor
    targets = ImageList.from_tensors([x["sem_seg"].to(device) for x in batch],
                                     model.backbone.size_divisibility, 255).tensor
    with torch.no_grad():
        logits, embedding = model.sem_seg_head.forward_features(model.backbone(images))
    return embedding, logits, targets


def _run_contrast(model, embedding, logits, targets, fixed_shapes):
    model.zero_grad(set_to_none=True)
    leaf = embedding.detach().clone().requires_grad_()
    prepared = model._prepare(targets, leaf.shape[-2:], fixed_shapes=fixed_shapes)
    with EventStorage(300):
        loss, rows, classes, stats = model._contrast(leaf, logits, targets, prepared)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.projector.named_parameters()}
    return loss.detach(), rows.detach(), classes, stats, leaf.grad, grads


@pytest.mark.parametrize("per_class", [0, 4])
def test_fixed_shape_contrast_is_the_eager_contrast(monkeypatch, per_class):
    model = _filled_model(make_cfg(SAMPLES_PER_CLASS=per_class))
    model.train()
    inputs = _contrast_inputs(model, make_batch(7, n=3))
    torch.manual_seed(3)
    eager = _run_contrast(model, *inputs, fixed_shapes=False)
    monkeypatch.setattr(model, "_runs_graphed", lambda: True)
    torch.manual_seed(3)  # the same draw of bank slots
    fixed = _run_contrast(model, *inputs, fixed_shapes=True)
    loss, rows, classes, stats, embedding_grad, grads = fixed
    assert float(eager[0]) > 0 and torch.equal(classes, eager[2])
    torch.testing.assert_close(loss, eager[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rows, eager[1], rtol=1e-5, atol=1e-6)
    for key in ("pos_cos", "neg_cos"):
        torch.testing.assert_close(stats[key], eager[3][key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embedding_grad, eager[4], rtol=1e-4, atol=1e-9)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager[5][name], rtol=1e-4, atol=1e-8)


def test_training_in_fixed_shapes_matches_eager_training(monkeypatch):
    """Whole steps: losses, gradients and the bank, step after step, as the bank fills."""
    eager, fixed = build(make_cfg()), build(make_cfg())
    monkeypatch.setattr(fixed, "_runs_graphed", lambda: True)
    for it in range(4):
        batch = make_batch(10 + it, n=3)
        torch.manual_seed(it)  # the same dropout masks
        losses_e, _ = train_step(eager, batch, it=200 + it)
        torch.manual_seed(it)
        losses_f, _ = train_step(fixed, batch, it=200 + it)
        for key in losses_e:
            torch.testing.assert_close(losses_f[key], losses_e[key], rtol=1e-5, atol=1e-7)
        for (name, a), (_, b) in zip(eager.named_parameters(), fixed.named_parameters()):
            if a.grad is not None:
                # Float32 sums in another order: relative to the gradient's scale.
                scale = float(a.grad.abs().max())
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale,
                                           msg=name)
        for key, value in eager.memory_bank.state_dict().items():
            torch.testing.assert_close(fixed.memory_bank.state_dict()[key], value,
                                       rtol=1e-5, atol=1e-6)
    assert float(losses_e["loss_contrast"]) > 0


def test_a_copied_model_contrasts_with_its_own_projector_and_bank():
    model = _filled_model(steps=1)
    clone = copy.deepcopy(model)
    assert clone._graphed.projector is clone.projector is not model.projector
    assert clone._graphed.bank is clone.memory_bank is not model.memory_bank


# ---- CUDA: captured graphs against the eager contrast ---------------------------------------


def _cuda_model(graphs, **rc):
    cfg = make_cfg(CUDA_GRAPHS=graphs, **rc)
    cfg.MODEL.DEVICE = "cuda"
    return build(cfg)


def _varied_batch(seed):
    """Images with few or many classes, so that the slots per image change between steps."""
    batch = make_batch(seed, n=2)
    if seed % 2:
        for x in batch:
            x["sem_seg"] = torch.where(x["sem_seg"] == 255, 255, x["sem_seg"] % 2)
    return batch


@needs_cuda
def test_cuda_graphs_train_as_the_eager_contrast():
    from region_contrast.solver import build_optimizer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    models = [_cuda_model(g) for g in (False, True)]
    optimizers = [build_optimizer(make_cfg(), m) for m in models]
    for it in range(8):
        batch = _varied_batch(it)
        results = []
        for model, optimizer in zip(models, optimizers):
            torch.manual_seed(it)  # the same draw of bank slots
            optimizer.zero_grad(set_to_none=True)
            losses, _ = train_step(model, batch, it=200 + it)
            optimizer.step()
            results.append({k: float(v) for k, v in losses.items()})
        for key in results[0]:
            assert results[1][key] == pytest.approx(results[0][key], rel=1e-4, abs=1e-6), key
    eager, graphed = models
    assert len(graphed._graphed._graphs) >= 2 and not eager._graphed._graphs
    assert results[0]["loss_contrast"] > 0
    for key, value in eager.memory_bank.state_dict().items():
        torch.testing.assert_close(graphed.memory_bank.state_dict()[key], value,
                                   rtol=1e-3, atol=1e-4)
    for (name, a), (_, b) in zip(eager.named_parameters(), graphed.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)


@needs_cuda
def test_cuda_graphs_draw_new_bank_slots_every_replay():
    """With SAMPLES_PER_CLASS, each replay draws its own slots (the draw is not frozen)."""
    model = _cuda_model(True, SAMPLES_PER_CLASS=3)
    for it in range(4):  # fill the bank (6 slots per class) and capture
        train_step(model, make_batch(it), it=200 + it)
    embedding, logits, targets = _contrast_inputs(model, make_batch(1))
    prepared = model._prepare(targets, embedding.shape[-2:], fixed_shapes=True)
    losses = []
    for _ in range(4):
        leaf = embedding.detach().clone().requires_grad_()
        with EventStorage(300):
            loss, _, _, _ = model._contrast(leaf, logits, targets, prepared)
        loss.backward()
        assert leaf.grad.abs().sum() > 0
        losses.append(float(loss))
    assert len(model._graphed._graphs) >= 1
    assert all(value > 0 for value in losses) and len(set(losses)) > 1, losses


@needs_cuda
def test_cuda_graph_replay_never_synchronizes():
    model = _cuda_model(True)
    for it in range(3):  # fill the bank and capture
        train_step(model, make_batch(it), it=200 + it)
    embedding, logits, targets = _contrast_inputs(model, make_batch(1))
    prepared = model._prepare(targets, embedding.shape[-2:], fixed_shapes=True)
    with EventStorage(300):  # captures this batch's shape if the steps above did not
        model._contrast(embedding.detach().clone().requires_grad_(), logits, targets, prepared)
    captured = len(model._graphed._graphs)
    leaf = embedding.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    with EventStorage(300):
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, rows, _, _ = model._contrast(leaf, logits, targets, prepared)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(model._graphed._graphs) == captured  # replayed, not captured again
    assert float(loss) > 0 and leaf.grad.abs().sum() > 0 and rows.shape[0] > 0


@needs_cuda
def test_cuda_graphs_follow_the_model_to_new_memory():
    model = _cuda_model(True)
    train_step(model, make_batch(0), it=200)
    before = model._graphed._where
    model.to("cpu").to("cuda")
    losses, _ = train_step(model, make_batch(1), it=201)
    assert model._graphed._where != before and float(losses["loss_contrast"]) > 0
