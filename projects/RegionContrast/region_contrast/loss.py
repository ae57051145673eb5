"""
Region contrastive loss against a class-labelled memory (METHOD.md section 4).

For an anchor ``a`` of class ``c`` and temperature ``t``, positives ``P`` are the memory rows of
class ``c`` and negatives ``N`` the rows of other classes::

    loss(a) = -1/|P| sum_{p in P} log( exp(a.p/t) / (exp(a.p/t) + sum_{n in N} exp(a.n/t)) )
            =  1/|P| sum_{p in P} ( logaddexp(l_p, L_neg) - l_p ),   L_neg = logsumexp_{n in N} l_n

and the result is the mean over anchors with ``|P| >= 1`` and ``|N| >= 1``.

The anchors x memory logits are computed in chunks of anchors, so that memory use is bounded by
the chunk size and autograd never holds the full logits matrix. The memory is a constant, so the
gradient with respect to the anchors (a hand-written formula) is computed from each chunk's
logits right after its loss terms, in the forward; the backward only scales it.

The memory's rows are grouped by class (the bank's ``snapshot`` and ``sample`` return them so;
other input is sorted once), so an anchor's positives are one contiguous span of columns: they
are gathered into a small (anchors, widest span) matrix, and the dense (anchors, memory) work per
chunk is two matmuls, one max, one exp, two sums and one scale. Nothing dense is indexed by a
boolean mask, and no pair list is built.

Everything that needs the host to read device values (grouping the memory, the positives' spans)
is in :func:`plan_region_contrast`, which needs the classes and the memory but not the anchors: a
caller can plan before it queues the network's forward, and the loss then never waits for the
GPU.

Pure tensor code: no config, no Detectron2, no I/O.
"""
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["ContrastPlan", "plan_region_contrast", "region_contrast_loss"]

_DEFAULT_MAX_ELEMENTS = 2**24


def _chunk_rows(num_anchors: int, num_memory: int, max_elements: int) -> int:
    return max(1, min(num_anchors, max_elements // max(num_memory, 1)))


class ContrastPlan(NamedTuple):
    """Which memory rows are each anchor's positives (:func:`plan_region_contrast`)."""

    memory: torch.Tensor  # (M, D) the memory, each class's rows contiguous, classes ascending
    cols: torch.Tensor  # (A, W) columns of each anchor's positives, W the most of one anchor
    pad: torch.Tensor  # (A, W) bool: padding past the anchor's positives (repeats a column)
    count: torch.Tensor  # (A,) positives of each anchor, at least 1 (an average's divisor)
    valid: torch.Tensor  # (A,) bool: at least one positive and one negative
    num_valid: torch.Tensor  # () long
    num_pairs: torch.Tensor  # () long, anchor-positive pairs


def plan_region_contrast(
    anchor_classes: torch.Tensor, memory: torch.Tensor, memory_classes: torch.Tensor
) -> ContrastPlan:
    """
    Groups the memory by class (one sort, unless it already is, as the bank's ``snapshot`` and
    ``sample`` are) and finds each anchor's span of positives. Reads device values on the host.
    """
    memory_classes = memory_classes.to(device=memory.device, dtype=torch.long)
    anchor_classes = anchor_classes.to(device=memory.device, dtype=torch.long)
    if memory_classes.numel() > 1 and not bool((memory_classes[1:] >= memory_classes[:-1]).all()):
        order = torch.argsort(memory_classes, stable=True)
        memory, memory_classes = memory[order], memory_classes[order]
    if memory_classes.numel() == 0:
        num_pos = torch.zeros_like(anchor_classes)
        start = num_pos
    else:
        classes, counts = torch.unique_consecutive(memory_classes, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        at = torch.searchsorted(classes, anchor_classes).clamp_(max=classes.numel() - 1)
        num_pos = torch.where(classes[at] == anchor_classes, counts[at], 0)
        start = first[at]
    valid = (num_pos > 0) & (num_pos < memory_classes.numel())
    width = int(num_pos.max()) if num_pos.numel() else 0
    offsets = torch.arange(width, device=memory.device)
    pad = offsets >= num_pos.unsqueeze(1)
    # Padding repeats the span's first column, a positive (a row without positives is invalid),
    # so the loss's writes through `cols` touch positive columns only.
    cols = start.unsqueeze(1) + offsets.masked_fill(pad, 0)
    return ContrastPlan(memory, cols, pad, num_pos.clamp(min=1), valid, valid.sum(),
                        num_pos.sum())


def _softplus(x):
    """log(1 + e^x), exact in float32 and float64. F.softplus is a scalar loop on the CPU."""
    if x.is_cuda:  # one kernel there
        return F.softplus(x)
    y = torch.exp(x.clamp(max=20.0))
    u = 1.0 + y
    # Kahan's log1p: the rounding of 1 + y cancels in log(u) * y / (u - 1); y where u rounds to 1.
    small = torch.where(u == 1.0, y, torch.log(u) * (y / (u - 1.0)))
    # Past 20, log(1 + e^x) = x + e^-x to within e^-2x.
    return torch.where(x > 20.0, x + torch.exp(-x), small)


def _chunk(scaled, cols, pad, count, valid, memory, temperature, with_grad):
    """
    Loss terms of a chunk of anchors (already divided by t), and optionally the gradient of
    their sum with respect to the anchors.

    With x_p = L - l_p, L = logsumexp of the negatives' logits:  term_p = softplus(x_p),
    d term_p / d l_p = -sigmoid(x_p) and d term_p / d l_n = sigmoid(x_p) e^(l_n - L).

    Returns (sum of valid per-anchor losses, sum of positive logits, sum of all logits, grad).
    """
    logits = scaled @ memory.t()
    logit_sum = logits.sum()
    pos_logits = logits.gather(1, cols)
    pos_sum = pos_logits.masked_fill(pad, 0.0).sum()
    # l = +inf on padding makes x = -inf there: its softplus and sigmoid are exactly 0.
    pos_logits.masked_fill_(pad, float("inf"))

    # Shifted by the negatives' max, their exps sum to >= 1: L never under- or overflows. A row
    # without negatives (max -inf) gets a finite stand-in; its exps are all 0.
    logits.scatter_(1, cols, float("-inf"))
    shift = logits.amax(dim=1).clamp_(min=torch.finfo(logits.dtype).min)
    neg = logits.sub_(shift.unsqueeze(1)).exp_()  # positives are exp(-inf) = 0
    neg_sum = neg.sum(dim=1)
    # L = -inf without negatives, so x = -inf and every term of such a row is 0.
    x = (torch.log(neg_sum) + shift).unsqueeze(1) - pos_logits
    count = count.to(scaled.dtype)
    valid = valid.to(scaled.dtype)
    loss_sum = (_softplus(x).sum(dim=1) / count * valid).sum()
    if not with_grad:
        return loss_sum, pos_sum, logit_sum, None

    pos_weight = torch.sigmoid(x) / count.unsqueeze(1)
    row_scale = valid / temperature
    # e^(l_n - L) = neg_n / neg_sum, and neg_sum >= 1 on valid rows (0 without negatives).
    neg_scale = pos_weight.sum(dim=1) / neg_sum.clamp(min=1.0) * row_scale
    weight = neg.mul_(neg_scale.unsqueeze(1))
    # Positive columns hold 0; padding entries add 0 to a positive column.
    weight.scatter_add_(1, cols, pos_weight * (-row_scale).unsqueeze(1))
    return loss_sum, pos_sum, logit_sum, weight @ memory


class _RegionContrastLoss(torch.autograd.Function):
    """
    The loss and, in the same pass over the logits, its gradient with respect to the anchors
    (the memory is constant): the backward only scales that (A, D) gradient. Nothing of the
    size of the logits or the memory is kept for the backward, so the memory may be a view of
    the bank that is written to right after the loss.
    """

    @staticmethod
    def forward(ctx, anchors, memory, plan, temperature, max_elements):
        num_anchors = anchors.shape[0]
        chunk = _chunk_rows(num_anchors, memory.shape[0], max_elements)
        scaled = anchors / temperature
        with_grad = ctx.needs_input_grad[0]
        per_anchor = (plan.cols, plan.pad, plan.count, plan.valid)
        if chunk >= num_anchors:  # the usual case: no slices, no accumulation
            total, pos_sum, logit_sum, grad = _chunk(
                scaled, *per_anchor, memory, temperature, with_grad
            )
        else:
            parts = [
                _chunk(scaled[lo : lo + chunk], *(t[lo : lo + chunk] for t in per_anchor),
                       memory, temperature, with_grad)
                for lo in range(0, num_anchors, chunk)
            ]
            total, pos_sum, logit_sum = (torch.stack(v).sum() for v in list(zip(*parts))[:3])
            grad = torch.cat([p[3] for p in parts]) if with_grad else None
        denominator = plan.num_valid.clamp(min=1).to(total.dtype)
        loss = total / denominator
        # Sums and counts of positive / negative cosines, for logging.
        num_pairs = plan.num_pairs.to(total.dtype)
        stats = torch.stack(
            [
                pos_sum * temperature,
                num_pairs,
                (logit_sum - pos_sum) * temperature,
                num_anchors * memory.shape[0] - num_pairs,
            ]
        )
        if with_grad:
            grad /= denominator
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(plan.num_valid, stats)
        return loss, plan.num_valid, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_num_valid, _grad_stats):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None


def region_contrast_loss(
    anchors: torch.Tensor,
    anchor_classes: torch.Tensor,
    memory: torch.Tensor,
    memory_classes: torch.Tensor,
    temperature: float,
    *,
    return_stats: bool = False,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
    plan: Optional[ContrastPlan] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """
    Args:
        anchors: (A, D), L2-normalised (not normalised here); any floating dtype, differentiable.
        anchor_classes: (A,) integer.
        memory: (M, D), L2-normalised; treated as constants (no gradient).
        memory_classes: (M,) integer.
        temperature: t > 0.
        return_stats: also return a dict of detached logging values: ``pos_cos`` and ``neg_cos``
            (mean cosine over all anchor-positive / anchor-negative pairs, NaN when there are
            none) and ``num_valid`` (anchors with at least one positive and one negative).
        max_elements: logits computed at most this many at a time (chunks of anchors).
        plan: :func:`plan_region_contrast` of these classes and memory, made earlier; the loss
            then reads no device value on the host.

    Returns:
        A float32 scalar (float64 for float64 inputs): the mean loss over valid anchors, or a
        zero that is still connected to ``anchors`` when none is valid.
    """
    if anchors.dim() != 2 or memory.dim() != 2 or anchors.shape[1] != memory.shape[1]:
        raise ValueError(
            f"anchors (A, D) and memory (M, D) must share D, got {tuple(anchors.shape)} and "
            f"{tuple(memory.shape)}"
        )
    if anchor_classes.shape != (anchors.shape[0],) or memory_classes.shape != (memory.shape[0],):
        raise ValueError(
            f"anchor_classes {tuple(anchor_classes.shape)} and memory_classes "
            f"{tuple(memory_classes.shape)} must be (A,) = ({anchors.shape[0]},) and "
            f"(M,) = ({memory.shape[0]},)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    # float32 whatever the autocast dtype: half-precision exp/logsumexp at t=0.1 is too coarse.
    dtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a = anchors.to(dtype)
        if a.shape[0] == 0 or memory.shape[0] == 0:
            loss = a.sum() * 0.0
            nan = torch.full((), float("nan"), dtype=dtype, device=a.device)
            num_valid = torch.zeros((), dtype=torch.long, device=a.device)
            stats = {"pos_cos": nan, "neg_cos": nan.clone(), "num_valid": num_valid}
        else:
            if plan is None:
                plan = plan_region_contrast(anchor_classes, memory.detach(), memory_classes)
            elif plan.cols.shape[0] != a.shape[0] or plan.memory.shape != memory.shape:
                raise ValueError(
                    f"the plan was made for {plan.cols.shape[0]} anchors and a memory of "
                    f"{tuple(plan.memory.shape)}, got {a.shape[0]} and {tuple(memory.shape)}"
                )
            m = plan.memory.detach().to(device=a.device, dtype=dtype)
            if plan.cols.device != a.device:
                moved = ("cols", "pad", "count", "valid", "num_valid", "num_pairs")
                plan = plan._replace(**{k: getattr(plan, k).to(a.device) for k in moved})
            loss, num_valid, sums = _RegionContrastLoss.apply(
                a, m, plan, float(temperature), int(max_elements)
            )
            stats = {
                "pos_cos": sums[0] / sums[1],  # 0/0 = NaN: no pairs of that kind
                "neg_cos": sums[2] / sums[3],
                "num_valid": num_valid,
            }
    if return_stats:
        return loss, stats
    return loss
