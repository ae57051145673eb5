"""region_contrast.loss against a direct float64 transcription of docs/method.md, section 4."""
import math

import pytest
import torch
import torch.nn.functional as F

from region_contrast.loss import region_contrast_loss


def reference_loss(anchors, anchor_classes, memory, memory_classes, temperature):
    """The formula as written, one anchor and one positive at a time, in float64."""
    anchors, memory = anchors.double(), memory.double().detach()
    losses = []
    for i in range(anchors.shape[0]):
        positives = [j for j in range(memory.shape[0]) if memory_classes[j] == anchor_classes[i]]
        negatives = [j for j in range(memory.shape[0]) if memory_classes[j] != anchor_classes[i]]
        if not positives or not negatives:
            continue
        negative_sum = sum(torch.exp(anchors[i] @ memory[n] / temperature) for n in negatives)
        terms = []
        for p in positives:
            positive = torch.exp(anchors[i] @ memory[p] / temperature)
            terms.append(torch.log(positive / (positive + negative_sum)))
        losses.append(-sum(terms) / len(positives))
    if not losses:
        return anchors.sum() * 0.0
    return sum(losses) / len(losses)


def unit(generator, n, d, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1).to(dtype)


def make_case(seed, num_anchors=6, num_memory=20, dim=8, num_classes=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    anchors = unit(g, num_anchors, dim, dtype)
    memory = unit(g, num_memory, dim, dtype)
    anchor_classes = torch.randint(0, num_classes + 1, (num_anchors,), generator=g)
    memory_classes = torch.randint(0, num_classes, (num_memory,), generator=g)
    return anchors, anchor_classes, memory, memory_classes


def loss_and_grad(anchors, *args, **kwargs):
    anchors = anchors.clone().requires_grad_()
    loss = region_contrast_loss(anchors, *args, **kwargs)
    loss.backward()
    return loss.detach(), anchors.grad


def reference_loss_and_grad(anchors, *args):
    anchors = anchors.detach().double().requires_grad_()
    loss = reference_loss(anchors, *args)
    loss.backward()
    return loss.detach(), anchors.grad


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [0.02, 0.05, 0.1, 0.5, 1.0])
def test_matches_reference(seed, temperature):
    # Anchor classes include a class (4) that the bank never holds: such anchors are skipped.
    anchors, anchor_classes, memory, memory_classes = make_case(seed)
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, temperature)
    ref, ref_grad = reference_loss_and_grad(anchors, anchor_classes, memory, memory_classes,
                                            temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_class_absent_from_bank_is_skipped_not_averaged():
    anchors, _, memory, memory_classes = make_case(10)
    anchor_classes = torch.tensor([0, 1, 99, 99, 2, 3])
    loss = region_contrast_loss(anchors, anchor_classes, memory, memory_classes, 0.1)
    keep = anchor_classes != 99
    only_present = region_contrast_loss(anchors[keep], anchor_classes[keep], memory,
                                        memory_classes, 0.1)
    torch.testing.assert_close(loss, only_present)
    _, stats = region_contrast_loss(anchors, anchor_classes, memory, memory_classes, 0.1,
                                    return_stats=True)
    assert int(stats["num_valid"]) == 4


def test_temperature_scales_logits():
    anchors, anchor_classes, memory, memory_classes = make_case(11)
    # The loss only sees a.m / t: doubling the anchors is the same as halving t.
    a = region_contrast_loss(anchors, anchor_classes, memory, memory_classes, 0.2)
    b = region_contrast_loss(anchors * 2, anchor_classes, memory, memory_classes, 0.4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, region_contrast_loss(anchors, anchor_classes, memory,
                                                      memory_classes, 0.4))


def _assert_zero_with_gradient(anchors, anchor_classes, memory, memory_classes):
    anchors = anchors.clone().requires_grad_()
    loss = region_contrast_loss(anchors, anchor_classes, memory, memory_classes, 0.1)
    assert loss.dim() == 0 and float(loss.detach()) == 0.0
    assert loss.requires_grad
    loss.backward()
    assert anchors.grad is not None and torch.equal(anchors.grad, torch.zeros_like(anchors))


def test_empty_bank_gives_zero_with_gradient():
    anchors, anchor_classes, _, _ = make_case(12)
    _assert_zero_with_gradient(anchors, anchor_classes, torch.zeros(0, 8), torch.zeros(0).long())


def test_no_anchors_gives_zero():
    _, _, memory, memory_classes = make_case(13)
    _assert_zero_with_gradient(torch.zeros(0, 8), torch.zeros(0).long(), memory, memory_classes)


def test_bank_of_one_class_has_no_negatives():
    anchors, _, memory, _ = make_case(14)
    anchor_classes = torch.tensor([0, 0, 1, 0, 2, 0])
    _assert_zero_with_gradient(anchors, anchor_classes, memory, torch.zeros(20).long())


def test_single_anchor():
    anchors, _, memory, memory_classes = make_case(15)
    anchor_classes = memory_classes[:1]
    loss, grad = loss_and_grad(anchors[:1], anchor_classes, memory, memory_classes, 0.1)
    ref, ref_grad = reference_loss_and_grad(anchors[:1], anchor_classes, memory, memory_classes,
                                            0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_one_positive_one_negative_closed_form():
    anchor = torch.tensor([[1.0, 0.0]])
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = region_contrast_loss(anchor, torch.tensor([0]), memory, torch.tensor([0, 1]), 0.5)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0)))
    assert abs(float(loss) - expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    anchors, anchor_classes, memory, memory_classes = make_case(16, dtype=dtype)
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref, ref_grad = reference_loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tolerance, atol=tolerance)


def test_under_autocast():
    anchors, anchor_classes, memory, memory_classes = make_case(17)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = region_contrast_loss(anchors, anchor_classes, memory, memory_classes, 0.1)
    ref = reference_loss(anchors, anchor_classes, memory, memory_classes, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_elements", [1, 20, 21, 47, 10**9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_unchunked(max_elements, dtype):
    # Chunks of anchors recomputed in the backward (torch.utils.checkpoint): the same result.
    anchors, anchor_classes, memory, memory_classes = make_case(18, num_anchors=13, dtype=dtype)
    full_loss, full_grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1)
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1,
                               max_elements=max_elements)
    # Only the matmuls' blocking differs between chunk sizes: float32 rounding, float64 exact.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, full_loss, **tol)
    torch.testing.assert_close(grad, full_grad, **tol)


def test_gradcheck_float64():
    anchors, anchor_classes, memory, memory_classes = make_case(19, num_anchors=5, num_memory=9,
                                                                dim=4, num_classes=3,
                                                                dtype=torch.float64)
    anchors.requires_grad_()
    for max_elements in (9, 10**6):
        assert torch.autograd.gradcheck(
            lambda a: region_contrast_loss(a, anchor_classes, memory, memory_classes, 0.3,
                                           max_elements=max_elements),
            (anchors,),
        )


def test_memory_gets_no_gradient():
    anchors, anchor_classes, memory, memory_classes = make_case(20)
    memory.requires_grad_()
    anchors.requires_grad_()
    region_contrast_loss(anchors, anchor_classes, memory, memory_classes, 0.1).backward()
    assert memory.grad is None and anchors.grad is not None


def test_large_logits_stay_finite():
    g = torch.Generator().manual_seed(21)
    memory = unit(g, 12, 6)
    memory_classes = torch.arange(12) % 3
    # Anchors equal to bank rows: a.p/t = 100 for the matching row, far from the others.
    anchors = torch.cat([memory[:3], -memory[3:6]])
    anchor_classes = memory_classes[:6]
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.01)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref, ref_grad = reference_loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.01)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-3)
    # Also with rows that lack negatives in the same batch (their zero weight must not be NaN).
    anchor_classes = torch.cat([anchor_classes, torch.tensor([7])])
    anchors = torch.cat([anchors, memory[:1]])
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.001)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_stats():
    anchors, anchor_classes, memory, memory_classes = make_case(22)
    _, stats = region_contrast_loss(anchors, anchor_classes, memory, memory_classes, 0.1,
                                    return_stats=True)
    cos = anchors.double() @ memory.double().t()
    positive = anchor_classes[:, None] == memory_classes[None, :]
    torch.testing.assert_close(stats["pos_cos"].double(), cos[positive].mean(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(stats["neg_cos"].double(), cos[~positive].mean(), rtol=1e-5,
                               atol=1e-6)
    has_pos, has_neg = positive.any(1), (~positive).any(1)
    assert int(stats["num_valid"]) == int((has_pos & has_neg).sum())
    assert not any(v.requires_grad for v in stats.values())
    _, empty = region_contrast_loss(anchors, anchor_classes, memory[:0], memory_classes[:0], 0.1,
                                    return_stats=True)
    assert int(empty["num_valid"]) == 0 and math.isnan(float(empty["pos_cos"]))


def test_shape_errors():
    anchors, anchor_classes, memory, memory_classes = make_case(23)
    with pytest.raises(ValueError, match="share D"):
        region_contrast_loss(anchors, anchor_classes, memory[:, :4], memory_classes, 0.1)
    with pytest.raises(ValueError, match="anchor_classes"):
        region_contrast_loss(anchors, anchor_classes[:2], memory, memory_classes, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        region_contrast_loss(anchors, anchor_classes, memory, memory_classes, 0.0)


def test_memory_order_does_not_matter():
    anchors, anchor_classes, memory, memory_classes = make_case(23, num_memory=30,
                                                                dtype=torch.float64)
    order = torch.argsort(memory_classes, stable=True)
    shuffled = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1)
    grouped = loss_and_grad(anchors, anchor_classes, memory[order], memory_classes[order], 0.1)
    descending = torch.argsort(-memory_classes, stable=True)
    reversed_ = loss_and_grad(anchors, anchor_classes, memory[descending],
                              memory_classes[descending], 0.1)
    for other in (grouped, reversed_):
        torch.testing.assert_close(other[0], shuffled[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(other[1], shuffled[1], rtol=1e-12, atol=1e-14)


def test_no_anchor_class_in_bank():
    anchors, _, memory, memory_classes = make_case(24)
    anchor_classes = torch.full((anchors.shape[0],), 9)
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_float64_anchors_against_a_float32_memory_are_computed_in_float64():
    anchors, anchor_classes, memory, memory_classes = make_case(3, dtype=torch.float64)
    memory32 = memory.float()
    loss, grad = loss_and_grad(anchors, anchor_classes, memory32, memory_classes, 0.1)
    same, same_grad = loss_and_grad(anchors, anchor_classes, memory32.double(), memory_classes, 0.1)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, same, rtol=1e-15, atol=0.0)
    torch.testing.assert_close(grad, same_grad, rtol=1e-15, atol=0.0)


def test_chunks_keep_nothing_of_the_logits_size_for_the_backward():
    # COCO-Stuff scale: 171 classes x 64 slots against 300 anchors; chunks of 2^16 logits.
    g = torch.Generator().manual_seed(30)
    anchors, memory = unit(g, 300, 32), unit(g, 171 * 64, 32)
    anchor_classes = torch.randint(0, 171, (300,), generator=g)
    memory_classes = torch.arange(171).repeat_interleave(64)
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    chunked = anchors.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = region_contrast_loss(chunked, anchor_classes, memory, memory_classes, 0.1,
                                    max_elements=2**16)
    # What autograd keeps for the backward is of the inputs' size, not (anchors x memory).
    assert sizes and max(sizes) <= memory.numel()
    loss.backward()
    full_loss, full_grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1)
    torch.testing.assert_close(loss.detach(), full_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.grad, full_grad, rtol=1e-4, atol=1e-7)
