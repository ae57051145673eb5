"""region_contrast.loss against a direct float64 transcription of METHOD.md section 4."""
import itertools
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


@pytest.mark.parametrize("products", ["default", "oneDNN"])
@pytest.mark.parametrize("max_dot", [None, 1.0])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [0.02, 0.05, 0.1, 0.5, 1.0])
def test_matches_reference(seed, temperature, max_dot, products, monkeypatch):
    # Anchor classes include a class (4) that the bank never holds: such anchors are skipped.
    # max_dot 1 (unit vectors) takes e^l without a shift, except at t = 0.02 (2 / t > 80).
    # "oneDNN": the CPU products take the oneDNN matmul at any size (by default only large ones).
    if products == "oneDNN":
        monkeypatch.setattr("region_contrast.loss._ONEDNN_MIN_MACS", 0)
    anchors, anchor_classes, memory, memory_classes = make_case(seed)
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, temperature,
                               max_dot=max_dot)
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


@pytest.mark.parametrize("max_dot", [None, 1.0])
@pytest.mark.parametrize("max_elements", [1, 20, 21, 47, 10**9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_unchunked(max_elements, dtype, max_dot):
    anchors, anchor_classes, memory, memory_classes = make_case(18, num_anchors=13, dtype=dtype)
    full_loss, full_grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1,
                                         max_dot=max_dot)
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1,
                               max_elements=max_elements, max_dot=max_dot)
    # Only the matmuls' blocking differs between chunk sizes: float32 rounding, float64 exact.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, full_loss, **tol)
    torch.testing.assert_close(grad, full_grad, **tol)


def test_gradcheck_float64():
    anchors, anchor_classes, memory, memory_classes = make_case(19, num_anchors=5, num_memory=9,
                                                                dim=4, num_classes=3,
                                                                dtype=torch.float64)
    anchors.requires_grad_()
    for max_elements, max_dot in itertools.product((9, 10**6), (None, 1.0)):
        assert torch.autograd.gradcheck(
            lambda a: region_contrast_loss(a, anchor_classes, memory, memory_classes, 0.3,
                                           max_elements=max_elements, max_dot=max_dot),
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
    # The loss groups the memory by class (one sort) unless it already is, as the bank's are.
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_and_sigmoid_match_float64(dtype):
    from region_contrast.loss import _softplus_and_sigmoid

    x = torch.cat([torch.linspace(-120, 120, 4001),
                   torch.tensor([-1e-9, 0, 1e-9, 20, 20.001, 39.99, 40, 40.01, 1e4])])
    x = x.to(dtype)
    wide = x.double()
    # float64 reference: log1p(e^x) below 0, x + log1p(e^-x) above.
    ref = torch.where(wide < 0, torch.log1p(torch.exp(wide)), wide + torch.log1p(torch.exp(-wide)))
    # Relative error at rounding level; float32's e^x underflows below its smallest normal.
    tol = (dict(rtol=3e-7, atol=torch.finfo(torch.float32).tiny) if dtype == torch.float32
           else dict(rtol=1e-15, atol=0.0))
    softplus, sigmoid = _softplus_and_sigmoid(x)
    torch.testing.assert_close(softplus.double(), ref, **tol)
    torch.testing.assert_close(sigmoid.double(), torch.sigmoid(wide), **tol)
    # -inf (padding, rows without negatives) gives exactly 0 for both.
    zero = _softplus_and_sigmoid(torch.tensor([float("-inf")], dtype=dtype))
    assert zero[0].item() == 0.0 and zero[1].item() == 0.0


@pytest.mark.parametrize("per_class", [0, 2, 5])
def test_plan_from_the_banks_class_counts_equals_planning_from_its_classes(per_class):
    from region_contrast.loss import plan_region_contrast
    from region_contrast.memory_bank import RegionMemoryBank

    g = torch.Generator().manual_seed(11)
    bank = RegionMemoryBank(6, 4, 8)
    # Classes 1 and 5 stay empty (5 is the last: its span would start past the end), class 3
    # partly filled, class 0 overflows its ring.
    classes = torch.tensor([0] * 6 + [2] * 4 + [3] * 2 + [4] * 4)
    bank.push(unit(g, classes.numel(), 8), classes)
    memory, memory_classes = bank.sample(per_class, generator=g)
    anchors = unit(g, 12, 8)
    anchor_classes = torch.arange(12) % 6
    counts, bound = bank.class_counts(per_class)
    assert bound == (per_class if 0 < per_class < 4 else 4) and int(counts.max()) <= bound
    fast = plan_region_contrast(anchor_classes, memory, memory_classes, class_counts=counts)
    # With the host-side bound, spans are padded to it instead of reading the widest one back.
    padded = plan_region_contrast(anchor_classes, memory, memory_classes, class_counts=counts,
                                  max_count=bound)
    slow = plan_region_contrast(anchor_classes, memory, memory_classes)
    assert padded.cols.shape == (12, bound)
    valid = slow.weight > 0  # rows without positives may point anywhere: they are weighted 0
    width = slow.cols.shape[1]
    for plan in (fast, padded):
        for name in ("weight", "num_valid", "pair_counts"):
            assert torch.equal(getattr(plan, name), getattr(slow, name)), name
        assert torch.equal(plan.cols[valid, :width], slow.cols[valid])
        assert torch.equal(plan.pad[valid, :width], slow.pad[valid])
        assert plan.pad[:, width:].all()
    expected = reference_loss(anchors, anchor_classes, memory, memory_classes, 0.1)
    for plan in (fast, padded, slow):
        loss = region_contrast_loss(anchors, anchor_classes, memory, memory_classes, 0.1,
                                    plan=plan)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_float64_anchors_against_a_float32_memory_are_computed_in_float64():
    anchors, anchor_classes, memory, memory_classes = make_case(3, dtype=torch.float64)
    memory32 = memory.float()
    loss, grad = loss_and_grad(anchors, anchor_classes, memory32, memory_classes, 0.1)
    same, same_grad = loss_and_grad(anchors, anchor_classes, memory32.double(), memory_classes, 0.1)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, same, rtol=1e-15, atol=0.0)
    torch.testing.assert_close(grad, same_grad, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1p_and_sigmoid_match_float64(dtype):
    from region_contrast.loss import _log1p_and_sigmoid

    # 0 (padding) to the largest ratio the shift-free loss can make (e^80 in float32).
    r = torch.cat([torch.zeros(1), torch.logspace(-30, 34, 4001, dtype=torch.float64)]).to(dtype)
    wide = r.double()
    tol = (dict(rtol=3e-7, atol=0.0) if dtype == torch.float32 else dict(rtol=1e-15, atol=0.0))
    log1p, sigmoid = _log1p_and_sigmoid(r.clone())
    torch.testing.assert_close(log1p.double(), torch.log1p(wide), **tol)
    torch.testing.assert_close(sigmoid.double(), wide / (1 + wide), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.0253, 0.1, 1.0])
def test_shift_free_chunk_equals_shifted(dtype, temperature):
    """
    Both ways of taking the log-sum-exp, on the same plan: padding, rows without negatives,
    anchors of a class absent from the memory, excluded columns and padding anchors included;
    and anchors equal or opposite to memory rows, the extreme logits (2 / 0.0253 + ln 31 = 82.5
    is past float32's limit for the loss, not for this direct call).
    """
    from region_contrast.loss import _chunk, plan_padded_contrast, plan_region_contrast

    g = torch.Generator().manual_seed(40)
    memory = unit(g, 31, 6, dtype)
    memory_classes = torch.arange(31) % 4
    order = torch.argsort(memory_classes, stable=True)
    memory, memory_classes = memory[order], memory_classes[order]
    anchors = torch.cat([unit(g, 5, 6, dtype), memory[:3], -memory[10:12]])
    anchor_classes = torch.tensor([0, 1, 2, 3, 9, 0, 0, 1, 2, 3])
    # A bank of one class: no anchor has a negative.
    plans = [plan_region_contrast(anchor_classes, memory, memory_classes),
             plan_region_contrast(anchor_classes % 4, memory[:8], memory_classes[:8])]
    filled = torch.rand(4, 8, generator=g) < 0.6
    filled = torch.sort(filled.int(), dim=1, descending=True).values.bool()
    padded = torch.cat([memory[:32 - 31], memory])[:32]
    plans.append(plan_padded_contrast(anchor_classes % 4, torch.rand(10, generator=g) < 0.7,
                                      padded, filled))
    for plan in plans:
        scaled = anchors / temperature
        per_anchor = (plan.cols, plan.pad, plan.weight.to(dtype), plan.anchor_mask)
        mem = plan.memory.to(dtype)
        shifted = _chunk(scaled, *per_anchor, mem, plan.excluded, True, False)
        free = _chunk(scaled, *per_anchor, mem, plan.excluded, True, True)
        tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                              atol=1e-15)
        for a, b in zip(free, shifted):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("per_class", [0, 3])
@pytest.mark.parametrize("max_dot", [None, 1.0])
def test_uniform_plan_of_a_full_bank_equals_the_general_plan(per_class, max_dot):
    """A full bank (every class the same number of rows): the plan without padding."""
    from region_contrast.loss import plan_region_contrast
    from region_contrast.memory_bank import RegionMemoryBank

    g = torch.Generator().manual_seed(12)
    bank = RegionMemoryBank(5, 4, 8)
    bank.push(unit(g, 27, 8), torch.arange(27) % 5)  # every ring wrapped at least once
    memory, memory_classes, width = bank.read(per_class, generator=g)
    assert width == (per_class or 4) and memory.shape[0] == 5 * width
    anchors = unit(g, 9, 8)
    anchor_classes = torch.tensor([0, 4, 4, 1, 2, 3, 0, 2, 1])
    uniform = plan_region_contrast(anchor_classes, memory, memory_classes, rows_per_class=width)
    general = plan_region_contrast(anchor_classes, memory, memory_classes)
    assert uniform.pad is None and not general.pad.any()
    for name in ("cols", "weight", "num_valid", "pair_counts"):
        assert torch.equal(getattr(uniform, name), getattr(general, name)), name
    expected, expected_grad = reference_loss_and_grad(anchors, anchor_classes, memory,
                                                      memory_classes, 0.1)
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1,
                               plan=uniform, max_dot=max_dot)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    # A bank of one class: no anchor has a negative, a zero that keeps its gradient.
    one = plan_region_contrast(torch.zeros(3, dtype=torch.long), memory[:width],
                               memory_classes[:width], rows_per_class=width)
    loss, grad = loss_and_grad(anchors[:3], torch.zeros(3, dtype=torch.long), memory[:width],
                               memory_classes[:width], 0.1, plan=one, max_dot=max_dot)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    with pytest.raises(ValueError, match=f"rows_per_class = {width} must .* divide the "
                                         f"memory's {5 * width - 1} rows"):
        plan_region_contrast(anchor_classes, memory[:-1], memory_classes[:-1],
                             rows_per_class=width)


def test_large_cpu_products_go_through_onednn_and_equal_float64():
    """At the sizes of a training step the loss's two products run on oneDNN (where PyTorch has
    it), and agree with float64 products; the float32 loss agrees with the float64 one."""
    from region_contrast import loss as loss_module
    from region_contrast.loss import _matmul_nt, _onednn_linear, plan_region_contrast

    if torch.backends.mkldnn.is_available():
        # A PyTorch upgrade that drops the op would silently fall back to torch.mm.
        assert _onednn_linear() is not None
    g = torch.Generator().manual_seed(5)
    num_classes, per_class, dim = 10, 300, 64
    memory = unit(g, num_classes * per_class, dim)
    memory_classes = torch.arange(num_classes).repeat_interleave(per_class)
    anchors = unit(g, 40, dim)
    assert anchors.shape[0] * memory.shape[0] * dim >= loss_module._ONEDNN_MIN_MACS
    logits = _matmul_nt(anchors, memory)
    torch.testing.assert_close(logits.double(), anchors.double() @ memory.double().t(),
                               rtol=0, atol=1e-6)
    back = torch.randn(40, memory.shape[0], generator=g)
    torch.testing.assert_close(_matmul_nt(back, memory.t()).double(),
                               back.double() @ memory.double(), rtol=1e-5, atol=1e-4)
    # The bank is written in place between steps: nothing of the old rows may be reused.
    memory[:50].mul_(-2.0)
    torch.testing.assert_close(_matmul_nt(anchors, memory).double(),
                               anchors.double() @ memory.double().t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(_matmul_nt(back, memory.t()).double(),
                               back.double() @ memory.double(), rtol=1e-5, atol=1e-4)
    memory[:50].div_(-2.0)
    with torch.backends.mkldnn.flags(enabled=False):
        assert _onednn_linear() is None
        assert torch.equal(_matmul_nt(anchors, memory), anchors @ memory.t())

    anchor_classes = torch.randint(0, num_classes, (40,), generator=g)
    plan = plan_region_contrast(anchor_classes, memory, memory_classes, rows_per_class=per_class)
    loss, grad = loss_and_grad(anchors, anchor_classes, memory, memory_classes, 0.1, plan=plan,
                               max_dot=1.01)
    plan64 = plan_region_contrast(anchor_classes, memory.double(), memory_classes,
                                  rows_per_class=per_class)
    loss64, grad64 = loss_and_grad(anchors.double(), anchor_classes, memory.double(),
                                   memory_classes, 0.1, plan=plan64)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-7)
