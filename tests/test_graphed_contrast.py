"""
The fixed-shape contrast that CUDA graphs replay (region_contrast.graphed_contrast) against the
eager contrast: the same loss, statistics, gradients and bank rows, on the CPU (where it runs
without graphs) and, on a CUDA machine, captured and replayed over a real training run.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from detectron2.utils.events import EventStorage
from region_contrast import graphed_contrast
from region_contrast.graphed_contrast import STATISTICS, dense_fits
from region_contrast.loss import plan_padded_contrast, region_contrast_loss
from region_contrast.memory_bank import RegionMemoryBank
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_push_is_push_of_the_masked_rows(dtype):
    """Random pushes with wrapping rings and overfull classes, against push itself."""
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        num_classes, size = int(torch.randint(1, 5, (1,), generator=g)), int(
            torch.randint(1, 6, (1,), generator=g))
        expected = RegionMemoryBank(num_classes, size, 3, dtype=dtype)
        masked = RegionMemoryBank(num_classes, size, 3, dtype=dtype)
        for _ in range(4):
            n = int(torch.randint(0, 12, (1,), generator=g))
            rows = torch.randn(n, 3, generator=g)
            classes = torch.randint(0, num_classes, (n,), generator=g)
            mask = torch.rand(n, generator=g) < 0.7
            # Masked-out rows may carry any class, in range or not.
            junk = torch.where(mask, classes, torch.randint(-5, 50, (n,), generator=g))
            expected.push(rows[mask], classes[mask])
            masked.push_masked(rows, junk, mask)
            for key, value in expected.state_dict().items():
                assert torch.equal(masked.state_dict()[key], value), (seed, key)


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


def _eager_contrast(model, embedding, logits, targets):
    model.zero_grad(set_to_none=True)
    leaf = embedding.detach().clone().requires_grad_()
    with EventStorage(300):
        loss, rows, classes, stats = model._contrast(leaf, logits, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.projector.named_parameters()}
    return loss.detach(), rows.detach(), classes, stats, leaf.grad, grads


def _dense_contrast(model, embedding, targets, push=False):
    model.zero_grad(set_to_none=True)
    leaf = embedding.detach().clone().requires_grad_()
    labels = model._labels_at(targets, leaf.shape[-2:])
    loss, statistics, rows, present = model._graphed(leaf, labels, push=push)
    loss = loss * model.loss_weight  # as the eager path returns it
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.projector.named_parameters()}
    return loss.detach(), statistics, rows, present, leaf.grad, grads


@pytest.mark.parametrize("per_class", [0, 4])
def test_dense_contrast_is_the_eager_contrast(per_class):
    model = _filled_model(make_cfg(SAMPLES_PER_CLASS=per_class))
    model.train()
    inputs = _contrast_inputs(model, make_batch(7, n=3))
    torch.manual_seed(3)
    loss, rows, classes, stats, embedding_grad, grads = _eager_contrast(model, *inputs)
    torch.manual_seed(3)  # the same draw of bank slots
    dense = _dense_contrast(model, inputs[0], inputs[2])
    values = dict(zip(STATISTICS, dense[1].tolist()))
    present = dense[3]
    assert float(loss) > 0 and present.sum() == classes.numel()
    assert torch.equal(torch.arange(NUM_CLASSES).repeat(3)[present], classes)
    torch.testing.assert_close(dense[0], loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dense[2][present], rows, rtol=1e-5, atol=1e-6)
    for key in ("pos_cos", "neg_cos"):
        assert values[key] == pytest.approx(float(stats[key]), rel=1e-5)
    assert values["filled"] == float(model.memory_bank.count.sum())
    assert values["num_invalid"] == 0 and values["pushed"] == 0
    torch.testing.assert_close(dense[4], embedding_grad, rtol=1e-4, atol=1e-9)
    for name, grad in grads.items():
        torch.testing.assert_close(dense[5][name], grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_contrast_of_a_half_precision_embedding_is_that_of_its_float32_copy(dtype):
    """The embedding enters as autocast made it; the contrast upcasts it while pooling."""
    model = _filled_model()
    model.train()
    embedding, _, targets = _contrast_inputs(model, make_batch(7, n=3))
    half = embedding.to(dtype)
    torch.manual_seed(3)
    wide = _dense_contrast(model, half.float(), targets)
    torch.manual_seed(3)
    got = _dense_contrast(model, half, targets)
    for a, b in zip(got[:4], wide[:4]):
        assert torch.equal(a, b)
    assert got[4].dtype == dtype and torch.equal(got[4], wide[4].to(dtype))
    for name, grad in wide[5].items():
        assert torch.equal(got[5][name], grad)


class _RefuseDeviceReads(TorchDispatchMode):
    """
    Fails on the operators that read device values back to the host (on CUDA: a
    synchronisation, which a graph capture refuses), whatever the device: item and
    ``bool()``, indexing with 0-d tensors or boolean masks, nonzero, unique, bincount.
    """

    READS = ("_local_scalar_dense", "nonzero.", "nonzero_numpy", "masked_select", "unique",
             "bincount", "repeat_interleave.Tensor")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(r in name for r in self.READS) or (
            name.startswith("aten.index.Tensor")
            and any(i is not None and i.dtype == torch.bool for i in args[1])
        ):
            raise AssertionError(f"{name} reads device values on the host")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("per_class", [0, 4])
def test_dense_contrast_reads_nothing_back(per_class):
    """What makes it capturable as a CUDA graph, checked on the CPU: forward, push, backward."""
    model = _filled_model(make_cfg(SAMPLES_PER_CLASS=per_class))
    model.train()
    embedding, _, targets = _contrast_inputs(model, make_batch(7))
    labels = model._labels_at(targets, embedding.shape[-2:])
    leaf = embedding.detach().clone().requires_grad_()
    ptr = model.memory_bank.ptr.clone()
    with _RefuseDeviceReads():
        loss, statistics, _, _ = model._graphed(leaf, labels, push=True)
        loss.backward()
    assert not torch.equal(model.memory_bank.ptr, ptr) and leaf.grad.abs().sum() > 0
    # The check does catch a read.
    with pytest.raises(AssertionError, match="_local_scalar_dense"), _RefuseDeviceReads():
        statistics[torch.tensor(0)]


def test_dense_contrast_pushes_nothing_after_a_loss_that_is_not_finite():
    model = _filled_model()
    model.train()
    embedding, _, targets = _contrast_inputs(model, make_batch(7))
    embedding[1, 3, 2, 2] = float("nan")
    before = copy.deepcopy(model.memory_bank.state_dict())
    loss, statistics, _, _, _, _ = _dense_contrast(model, embedding, targets, push=True)
    assert not torch.isfinite(loss)
    assert dict(zip(STATISTICS, statistics.tolist()))["pushed"] == 0
    for key, value in before.items():
        assert torch.equal(model.memory_bank.state_dict()[key], value)
    # ... and the same batch without the NaN is pushed.
    embedding[1, 3, 2, 2] = 0.0
    _, statistics, _, _, _, _ = _dense_contrast(model, embedding, targets, push=True)
    assert dict(zip(STATISTICS, statistics.tolist()))["pushed"] == 1
    assert not torch.equal(model.memory_bank.ptr, before["ptr"])


def _assert_same_gradients_and_bank(expected, got, *, grad_rtol, grad_atol, bank_rtol,
                                    bank_atol):
    """
    Gradients and bank state of two models after the same step; ``grad_atol`` is relative to
    each gradient's scale (float32 sums in another order).
    """
    for (name, a), (_, b) in zip(expected.named_parameters(), got.named_parameters()):
        if a.grad is not None:
            scale = float(a.grad.abs().max())
            torch.testing.assert_close(b.grad, a.grad, rtol=grad_rtol, atol=grad_atol * scale,
                                       msg=name)
    for key, value in expected.memory_bank.state_dict().items():
        torch.testing.assert_close(got.memory_bank.state_dict()[key], value, rtol=bank_rtol,
                                   atol=bank_atol)


def test_training_in_fixed_shapes_matches_eager_training(monkeypatch):
    """
    Whole steps: losses, gradients and the bank, step after step, as the bank fills; the
    statistics are logged one step later.
    """
    eager, fixed = build(make_cfg()), build(make_cfg())
    monkeypatch.setattr(fixed, "_runs_graphed", lambda num_images: True)
    logged = []
    for it in range(4):
        batch = make_batch(10 + it, n=3)
        torch.manual_seed(it)  # the same dropout masks
        losses_e, storage_e = train_step(eager, batch, it=200 + it)
        torch.manual_seed(it)
        losses_f, storage_f = train_step(fixed, batch, it=200 + it)
        logged.append((storage_e.latest(), storage_f.latest()))
        for key in losses_e:
            torch.testing.assert_close(losses_f[key], losses_e[key], rtol=1e-5, atol=1e-7)
        _assert_same_gradients_and_bank(eager, fixed, grad_rtol=1e-4, grad_atol=1e-5,
                                        bank_rtol=1e-5, bank_atol=1e-6)
    assert float(losses_e["loss_contrast"]) > 0
    assert "region_contrast_pos_cos" not in logged[0][1]
    for (previous, _), (_, now) in zip(logged, logged[1:]):
        for key in ("region_contrast_pos_cos", "region_contrast_bank_fill"):
            assert now[key][0] == pytest.approx(previous[key][0], rel=1e-5, nan_ok=True), key


def test_invalid_labels_in_fixed_shapes_raise_before_the_forward(monkeypatch):
    model = _filled_model()
    monkeypatch.setattr(model, "_runs_graphed", lambda num_images: True)
    train_step(model, make_batch(4), it=300)  # statistics pending: read with the check
    batch = make_batch(5)
    batch[1]["sem_seg"][:8, :8] = 7  # NUM_CLASSES is 5
    before = copy.deepcopy(model.memory_bank.state_dict())
    with pytest.raises(ValueError, match=r"value\(s\) \[7\] outside \[0, 5\)"):
        train_step(model, batch, it=301)
    for key, value in before.items():
        assert torch.equal(model.memory_bank.state_dict()[key], value)


def test_dense_contrast_counts_invalid_labels_and_pushes_nothing():
    model = _filled_model()
    model.train()
    embedding, _, targets = _contrast_inputs(model, make_batch(7))
    targets[0, :16, :16] = 9
    targets[1, :8, :8] = -3
    before = copy.deepcopy(model.memory_bank.state_dict())
    _, statistics, _, _, _, _ = _dense_contrast(model, embedding, targets, push=True)
    values = dict(zip(STATISTICS, statistics.tolist()))
    assert values["num_invalid"] > 0 and values["pushed"] == 0
    assert (values["invalid_min"], values["invalid_max"]) == (-3, 9)
    for key, value in before.items():
        assert torch.equal(model.memory_bank.state_dict()[key], value)
    with pytest.raises(ValueError, match=r"previous training batch.*\[-3, 9\]"):
        model._check_labels(values, previous=True)


def test_graphs_only_for_batches_whose_padding_stays_small(monkeypatch):
    """Every recipe's per-GPU batch is graphed; a 16-image batch of 171 classes is not."""
    assert dense_fits(1, 19, 19 * 2975) and dense_fits(8, 19, 19 * 2975)  # Cityscapes
    assert dense_fits(2, 150, 150 * 100) and dense_fits(2, 171, 171 * 100)  # ADE20K, COCO
    assert not dense_fits(16, 171, 171 * 100)
    cfg = make_cfg(SAMPLES_PER_CLASS=4)  # 5 classes x 4 sampled rows
    model = build(cfg)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(graphed_contrast, "MAX_DENSE_LOGITS", 3 * 5 * 5 * 4)
    assert model._runs_graphed(3) and not model._runs_graphed(4)
    model.cuda_graphs = False
    assert not model._runs_graphed(1)


def test_a_copied_model_contrasts_with_its_own_projector_and_bank():
    model = _filled_model(steps=1)
    clone = copy.deepcopy(model)
    assert clone._graphed.projector is clone.projector is not model.projector
    assert clone._graphed.bank is clone.memory_bank is not model.memory_bank
    assert clone._graphed.module_args["projector"] is clone.projector


# ---- CUDA: captured graphs against the eager contrast ---------------------------------------


def _cuda_model(graphs, **rc):
    cfg = make_cfg(CUDA_GRAPHS=graphs, **rc)
    cfg.MODEL.DEVICE = "cuda"
    return build(cfg)


@needs_cuda
def test_cuda_graphs_train_as_the_eager_contrast():
    """
    Step after step on the same weights: losses, gradients and the bank as without graphs.
    (No optimizer: AdamW turns float32 rounding differences in near-zero gradients into
    visible weight differences within a few steps.)
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager, graphed = (_cuda_model(g) for g in (False, True))
    for it in range(6):
        batch = make_batch(it, n=2)
        losses = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(it)  # the same dropout masks
            losses.append({k: float(v) for k, v in train_step(model, batch, it=200 + it)[0].items()})
        for key in losses[0]:
            assert losses[1][key] == pytest.approx(losses[0][key], rel=1e-4, abs=1e-6), key
        _assert_same_gradients_and_bank(eager, graphed, grad_rtol=1e-3, grad_atol=1e-4,
                                        bank_rtol=1e-4, bank_atol=1e-5)
    assert len(graphed._graphed._graphs) == 1 and not eager._graphed._graphs
    assert losses[0]["loss_contrast"] > 0


def _captured(model, steps=3):
    for it in range(steps):  # fill the bank and capture
        train_step(model, make_batch(it), it=200 + it)
    embedding, _, targets = _contrast_inputs(model, make_batch(1))
    return embedding, model._labels_at(targets, embedding.shape[-2:])


@needs_cuda
def test_cuda_graphs_draw_new_bank_slots_every_replay():
    """With SAMPLES_PER_CLASS, each replay draws its own slots (the draw is not frozen)."""
    model = _cuda_model(True, SAMPLES_PER_CLASS=3)
    embedding, labels = _captured(model, steps=4)
    losses = []
    for _ in range(4):
        leaf = embedding.detach().clone().requires_grad_()
        loss, _, _, _ = model._graphed(leaf, labels, push=False)
        loss.backward()
        assert leaf.grad.abs().sum() > 0
        losses.append(float(loss))
    assert len(model._graphed._graphs) == 2  # the training steps' and this one (push=False)
    assert all(value > 0 for value in losses) and len(set(losses)) > 1, losses


@needs_cuda
def test_cuda_graph_replay_never_synchronizes():
    model = _cuda_model(True)
    embedding, labels = _captured(model)
    captured = len(model._graphed._graphs)
    count = model.memory_bank.count.clone()
    ptr = model.memory_bank.ptr.clone()
    leaf = embedding.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, statistics, _, _ = model._graphed(leaf, labels)  # forward, loss, push
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(model._graphed._graphs) == captured  # replayed, not captured again
    assert float(loss) > 0 and leaf.grad.abs().sum() > 0
    assert dict(zip(STATISTICS, statistics.tolist()))["pushed"] == 1
    assert not torch.equal(model.memory_bank.ptr, ptr) or not torch.equal(
        model.memory_bank.count, count)


@needs_cuda
def test_cuda_graphs_follow_the_model_to_new_memory():
    model = _cuda_model(True)
    train_step(model, make_batch(0), it=200)
    before = model._graphed._where
    model.to("cpu").to("cuda")
    losses, _ = train_step(model, make_batch(1), it=201)
    assert model._graphed._where != before and float(losses["loss_contrast"]) > 0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_pooling_of_half_precision_features_is_that_of_their_float32_copy(dtype):
    """Half inputs with float32 sums (a tensor-core matmul): the upcast features' sums."""
    from region_contrast import regions

    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 32, 48, 64, generator=g).to("cuda", dtype)
    slot = torch.randint(0, 8, (2, 48 * 64), generator=g).cuda()  # 7 slots, 7 = none
    grad = torch.randn(2 * 7, 32, generator=g).cuda()
    got, wide = (features.clone().requires_grad_(), features.float().requires_grad_())
    torch.backends.cuda.matmul.allow_tf32 = False
    sums, counts = regions.pool_slots(got, slot, 7)
    sums_ref, counts_ref = regions.pool_slots(wide, slot, 7)
    assert sums.dtype == counts.dtype == torch.float32 and torch.equal(counts, counts_ref)
    # Exact products, float32 sums of ~440 values in another order.
    torch.testing.assert_close(sums, sums_ref, rtol=1e-5, atol=1e-4)
    (sums * grad).sum().backward()
    (sums_ref * grad).sum().backward()
    assert got.grad.dtype == dtype and torch.equal(got.grad, wide.grad.to(dtype))
    print("half inputs pooled as they are:", regions._sums_in_half_inputs(features))
