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
boolean mask, and no pair list is built. When the caller bounds the logits (unit vectors at the
usual temperatures, ``max_dot``), the log-sum-exp needs no max and no shift.

Everything that needs the host to read device values (grouping the memory, the positives' spans)
is in :func:`plan_region_contrast`, which needs the classes and the memory but not the anchors: a
caller can plan before it queues the network's forward, and the loss then never waits for the
GPU.

Pure tensor code: no config, no Detectron2, no I/O.
"""
import math
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["ContrastPlan", "plan_padded_contrast", "plan_region_contrast", "region_contrast_loss"]

_DEFAULT_MAX_ELEMENTS = 2**24


def _chunk_rows(num_anchors: int, num_memory: int, max_elements: int) -> int:
    return max(1, min(num_anchors, max_elements // max(num_memory, 1)))


class ContrastPlan(NamedTuple):
    """Which memory rows are each anchor's positives (:func:`plan_region_contrast`)."""

    memory: torch.Tensor  # (M, D) the memory, each class's rows contiguous, classes ascending
    cols: torch.Tensor  # (A, W) columns of each anchor's positives, W the most of one anchor
    # (A, W) bool: padding past the anchor's positives (repeats a column), or None (no padding).
    pad: Optional[torch.Tensor]
    # (A,) valid / (positives * valid anchors): an anchor's share of the mean loss is this times
    # the sum of its positives' terms (0 for an anchor without a positive or a negative).
    weight: torch.Tensor
    num_valid: torch.Tensor  # () long, anchors with at least one positive and one negative
    pair_counts: torch.Tensor  # (2,) anchor-positive and anchor-negative pairs, as weight's dtype
    # (M,) bool: memory rows that are not there (unfilled slots of a fixed-shape memory), or None.
    excluded: Optional[torch.Tensor] = None
    # (A,) 1 for anchors that exist, 0 for padding rows of a fixed-shape batch, or None (all 1).
    anchor_mask: Optional[torch.Tensor] = None


def plan_region_contrast(
    anchor_classes: torch.Tensor,
    memory: torch.Tensor,
    memory_classes: torch.Tensor,
    *,
    class_counts: Optional[torch.Tensor] = None,
    max_count: Optional[int] = None,
    rows_per_class: Optional[int] = None,
) -> ContrastPlan:
    """
    Groups the memory by class (one sort, unless it already is, as the bank's ``snapshot`` and
    ``sample`` are) and finds each anchor's span of positives. Reads device values on the host.

    ``class_counts`` (rows of each class 0, 1, ...) says that the memory is already grouped by
    class in ascending order, as the bank's ``snapshot`` and ``sample`` return it (the bank's
    ``class_counts`` gives them); the anchors' classes must then be below its length. With
    ``max_count`` as well, a bound on those counts known on the host (the bank's slots per
    class), the plan reads nothing back: spans are padded to that width.

    ``rows_per_class`` says more: the memory is grouped by class in ascending order and every
    class has exactly that many rows (a full bank, the steady state: the third value of the
    bank's ``read``), and the anchors' classes are below ``M / rows_per_class``. The plan
    then reads nothing back and needs no padding; ``class_counts`` and ``max_count`` are
    not used.
    """
    device = memory.device
    anchor_classes = anchor_classes.to(device=device, dtype=torch.long)
    num_memory = memory.shape[0]
    dtype = torch.float64 if memory.dtype == torch.float64 else torch.float32
    if rows_per_class is not None:
        return _uniform_plan(anchor_classes, memory, rows_per_class, dtype)
    if class_counts is not None:
        counts = class_counts.to(device=device, dtype=torch.long)
        num_pos = counts[anchor_classes]
        # A class without rows past the last one that has some would start past the end.
        start = (torch.cumsum(counts, 0) - counts)[anchor_classes].clamp_(max=num_memory - 1)
    else:
        memory_classes = memory_classes.to(device=device, dtype=torch.long)
        if num_memory > 1 and not bool((memory_classes[1:] >= memory_classes[:-1]).all()):
            order = torch.argsort(memory_classes, stable=True)
            memory, memory_classes = memory[order], memory_classes[order]
        if num_memory == 0:
            num_pos = torch.zeros_like(anchor_classes)
            start = num_pos
        else:
            classes, counts = torch.unique_consecutive(memory_classes, return_counts=True)
            first = torch.cumsum(counts, 0) - counts
            at = torch.searchsorted(classes, anchor_classes).clamp_(max=classes.numel() - 1)
            num_pos = torch.where(classes[at] == anchor_classes, counts[at], 0)
            start = first[at]
    valid = (num_pos > 0) & (num_pos < num_memory)
    if class_counts is not None and max_count is not None:
        width = max_count if num_pos.numel() else 0
    else:
        width = int(num_pos.max()) if num_pos.numel() else 0
    cols, pad, weight, num_valid = _spans(start, num_pos, valid, width, dtype)
    num_pairs = num_pos.sum()
    pair_counts = torch.stack([num_pairs, anchor_classes.numel() * num_memory - num_pairs])
    return ContrastPlan(memory, cols, pad, weight, num_valid, pair_counts.to(dtype))


def _spans(start, num_pos, valid, width, dtype):
    """
    Each anchor's positives as ``width`` columns from ``start``, of which the first ``num_pos``
    are real, and its share of the mean loss: (cols, pad, weight, num_valid) of the plan.
    """
    num_valid = valid.sum()
    offsets = torch.arange(width, device=start.device)
    pad = offsets >= num_pos.unsqueeze(1)
    # Padding repeats the span's first column, a positive for a valid row, so the loss's writes
    # through `cols` touch only positive columns of valid rows (an invalid row is weighted 0).
    cols = start.unsqueeze(1) + offsets.masked_fill(pad, 0)
    weight = valid.to(dtype) / (num_pos.clamp(min=1) * num_valid.clamp(min=1))
    return cols, pad, weight, num_valid


def _uniform_plan(anchor_classes, memory, width, dtype):
    """The plan when every class has ``width`` rows: a handful of operators, known counts."""
    num_anchors, num_memory = anchor_classes.numel(), memory.shape[0]
    if width < 1 or num_memory % width:
        raise ValueError(f"rows_per_class = {width} must be >= 1 and divide the memory's "
                         f"{num_memory} rows")
    device = memory.device
    # Every anchor has `width` positives, and negatives when there is a second class.
    valid = num_anchors if num_memory > width else 0
    cols = (anchor_classes * width).unsqueeze(1) + torch.arange(width, device=device)
    weight = torch.full((num_anchors,), 1.0 / (width * valid) if valid else 0.0, dtype=dtype,
                        device=device)
    num_valid = torch.full((), valid, dtype=torch.long, device=device)
    pair_counts = torch.tensor([num_anchors * width, num_anchors * (num_memory - width)],
                               dtype=dtype, device=device)
    return ContrastPlan(memory, cols, None, weight, num_valid, pair_counts)


def plan_padded_contrast(
    anchor_classes: torch.Tensor,
    anchor_valid: torch.Tensor,
    memory: torch.Tensor,
    filled: torch.Tensor,
) -> ContrastPlan:
    """
    The plan for fixed shapes, with no host read: what a CUDA graph can capture.

    The memory (C * S, D) is C classes of S rows each, of which ``filled`` (C, S) says which are
    there; each class's filled rows come first (the bank's ``padded_rows``). Anchors whose
    ``anchor_valid`` (A,) is False are padding: they take no part in the loss or its
    statistics. The loss is then that of the real anchors against the filled rows, as
    :func:`plan_region_contrast` plans it.
    """
    device = memory.device
    num_classes, width = filled.shape
    anchor_classes = anchor_classes.to(device=device, dtype=torch.long)
    counts = filled.sum(dim=1)
    num_pos = torch.where(anchor_valid, counts[anchor_classes], 0)
    total = counts.sum()
    valid = anchor_valid & (num_pos > 0) & (num_pos < total)
    dtype = torch.float64 if memory.dtype == torch.float64 else torch.float32
    cols, pad, weight, num_valid = _spans(anchor_classes * width, num_pos, valid, width, dtype)
    num_pairs = num_pos.sum()
    pair_counts = torch.stack([num_pairs, anchor_valid.sum() * total - num_pairs])
    return ContrastPlan(memory, cols, pad, weight, num_valid, pair_counts.to(dtype),
                        ~filled.reshape(-1), anchor_valid.to(dtype))


# The CPU's float32 products of the loss (anchors x memory rows, and back) go to oneDNN's matmul
# when they have at least this many multiply-adds: on the 2-core AMD EPYC of the README it runs
# them about 2x faster than torch.mm (MKL) (tools/benchmark.py, part 3's products); smaller ones
# stay on torch.mm, where oneDNN's cost per call outweighs its speed.
_ONEDNN_MIN_MACS = 2**20
_ONEDNN_LINEAR = {}  # "op": the op, or None where this PyTorch has none that works (probed once)


def _onednn_linear():
    """
    PyTorch's oneDNN linear on dense tensors (``torch.ops.mkldnn._linear_pointwise``, what its
    compiler emits for linear layers on the CPU), or None where the build lacks it, oneDNN is
    switched off (``torch.backends.mkldnn``), or it disagrees with ``torch.mm`` on a probe.
    """
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    if "op" not in _ONEDNN_LINEAR:
        op = None
        try:
            candidate = torch.ops.mkldnn._linear_pointwise
            x = torch.arange(6.0).view(2, 3)
            w = torch.arange(12.0).view(4, 3).sub_(5.0)
            if torch.equal(candidate(x, w, None, "none", [], ""), x @ w.t()):
                op = candidate
        except (AttributeError, RuntimeError, TypeError):
            pass
        _ONEDNN_LINEAR["op"] = op
    return _ONEDNN_LINEAR["op"]


def _onednn_for(x: torch.Tensor, w: torch.Tensor):
    """The oneDNN op that :func:`_matmul_nt` runs ``x @ w.t()`` with, or None (``torch.mm``)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.shape[0] * w.shape[0] * x.shape[1] >= _ONEDNN_MIN_MACS):
        return _onednn_linear()
    return None


def _matmul_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.t()`` for x (A, K) and w (N, K), any strides: through oneDNN where it is faster."""
    op = _onednn_for(x, w)
    return x @ w.t() if op is None else op(x, w, None, "none", [], "")


_SOFTPLUS_TAIL = 40.0  # past it, log(1 + e^x) = x to within e^-40 / 40: below float64's epsilon

# The largest 2 * max|logit| + ln(memory rows) at which the loss takes e^l without a shift:
# e^l, the negatives' sums and their ratios to a positive's e^l then all stay normal numbers
# (float32's lie in [e^-87, e^88]).
_SHIFT_FREE_LIMIT = {torch.float32: 80.0, torch.float64: 700.0}


def _log1p_and_sigmoid(r):
    """
    log(1 + r) and r / (1 + r) for finite r >= 0, exact in float32 and float64 from one log
    (log1p is a scalar loop on the CPU). Overwrites ``r``.
    """
    u = r + 1.0
    # log1p(r) = log(u) minus the rounding of u = 1 + r, to first order: (u - 1 - r) / u.
    log1p = torch.log(u).sub_((u - 1.0).sub_(r).div_(u))
    return log1p, r.div_(u)


def _softplus_and_sigmoid(x):
    """
    log(1 + e^x) and 1 / (1 + e^-x), exact in float32 and float64 (F.softplus is a scalar loop
    on the CPU), from one exp.
    """
    softplus, sigmoid = _log1p_and_sigmoid(torch.exp(x.clamp(max=_SOFTPLUS_TAIL)))
    return softplus.add_((x - _SOFTPLUS_TAIL).clamp_(min=0.0)), sigmoid


def _chunk(scaled, cols, pad, weight, anchor_mask, memory, excluded, with_grad, shift_free):
    """
    A chunk of anchors (already divided by t): their weighted loss terms, and optionally the
    gradient of that sum with respect to ``scaled``.

    With x_p = L - l_p, L = logsumexp of the negatives' logits:  term_p = softplus(x_p),
    d term_p / d l_p = -sigmoid(x_p) and d term_p / d l_n = sigmoid(x_p) e^(l_n - L).
    ``shift_free`` says that the logits are small enough (``_SHIFT_FREE_LIMIT``) to take e^l
    as they are; otherwise each row is shifted by its negatives' max.

    Returns (weighted sum of the terms, sum of positive logits, sum of all logits, grad).
    """
    logits = _matmul_nt(scaled, memory)
    if excluded is not None:
        logits.masked_fill_(excluded, 0.0)
    logit_sum = logits.sum() if anchor_mask is None else logits.sum(dim=1) @ anchor_mask
    pos_logits = logits.gather(1, cols)
    pos_sum = (pos_logits if pad is None else pos_logits.masked_fill(pad, 0.0)).sum()

    if shift_free:
        neg = logits.exp_().scatter_(1, cols, 0.0)
        if excluded is not None:
            neg.masked_fill_(excluded, 0.0)
        neg_sum = neg.sum(dim=1)
        # e^(x_p) = sum_n e^(l_n) / e^(l_p); +inf on padding makes it 0, and so its term and
        # sigmoid. A row without negatives has a sum of 0, and 0s there too.
        pos_exp = pos_logits.exp_()
        if pad is not None:
            pos_exp.masked_fill_(pad, float("inf"))
        ratio = neg_sum.unsqueeze(1) / pos_exp
        terms, sigmoid = _log1p_and_sigmoid(ratio)
        # e^(l_n - L) = neg_n / neg_sum; a valid row's sum is at least e^(-max|logit|).
        divisor = neg_sum.clamp_(min=torch.finfo(neg_sum.dtype).tiny)
    else:
        # l = +inf on padding makes x = -inf there: its softplus and sigmoid are exactly 0.
        if pad is not None:
            pos_logits.masked_fill_(pad, float("inf"))
        # Shifted by the negatives' max, their exps sum to >= 1: L never under- or overflows.
        # A row without negatives (max -inf) gets a finite stand-in; its exps are all 0.
        logits.scatter_(1, cols, float("-inf"))
        if excluded is not None:
            logits.masked_fill_(excluded, float("-inf"))
        shift = logits.amax(dim=1).clamp_(min=torch.finfo(logits.dtype).min)
        neg = logits.sub_(shift.unsqueeze(1)).exp_()  # positives are exp(-inf) = 0
        neg_sum = neg.sum(dim=1)
        # L = -inf without negatives, so x = -inf and every term of such a row is 0.
        x = torch.log(neg_sum).add_(shift).unsqueeze(1) - pos_logits
        terms, sigmoid = _softplus_and_sigmoid(x)
        # e^(l_n - L) = neg_n / neg_sum, and neg_sum >= 1 on valid rows (0 without negatives).
        divisor = neg_sum.clamp_(min=1.0)
    loss_sum = terms.sum(dim=1) @ weight
    if not with_grad:
        return loss_sum, pos_sum, logit_sum, None

    pos_weight = sigmoid.mul_(weight.unsqueeze(1))
    neg_scale = pos_weight.sum(dim=1).div_(divisor)
    grad_logits = neg.mul_(neg_scale.unsqueeze(1))
    # Positive columns hold 0; padding entries add 0 to a positive column.
    grad_logits.scatter_add_(1, cols, pos_weight.neg_())
    return loss_sum, pos_sum, logit_sum, _matmul_nt(grad_logits, memory.t())


class _RegionContrastLoss(torch.autograd.Function):
    """
    The loss and, in the same pass over the logits, its gradient with respect to the anchors
    (the memory is constant): the backward only scales that (A, D) gradient. Nothing of the
    size of the logits or the memory is kept for the backward, so the memory may be a view of
    the bank that is written to right after the loss.
    """

    @staticmethod
    def forward(ctx, anchors, memory, plan, temperature, max_elements, max_dot):
        num_anchors = anchors.shape[0]
        chunk = _chunk_rows(num_anchors, memory.shape[0], max_elements)
        scaled = anchors / temperature
        with_grad = ctx.needs_input_grad[0]
        shift_free = max_dot is not None and (
            2.0 * max_dot / temperature + math.log(memory.shape[0])
            <= _SHIFT_FREE_LIMIT[memory.dtype])
        per_anchor = (plan.cols, plan.pad, plan.weight, plan.anchor_mask)
        if chunk >= num_anchors:  # the usual case: no slices, no accumulation
            loss, pos_sum, logit_sum, grad = _chunk(scaled, *per_anchor, memory, plan.excluded,
                                                    with_grad, shift_free)
        else:
            parts = [
                _chunk(scaled[lo : lo + chunk],
                       *(None if t is None else t[lo : lo + chunk] for t in per_anchor),
                       memory, plan.excluded, with_grad, shift_free)
                for lo in range(0, num_anchors, chunk)
            ]
            loss, pos_sum, logit_sum = (torch.stack(v).sum() for v in list(zip(*parts))[:3])
            grad = torch.cat([p[3] for p in parts]) if with_grad else None
        # Mean positive and negative cosines, for logging (0/0 = NaN: no pair of that kind).
        cosines = torch.stack([pos_sum, logit_sum - pos_sum]).mul_(temperature)
        cosines /= plan.pair_counts
        if with_grad:
            ctx.save_for_backward(grad.div_(temperature))  # d scaled / d anchors = 1 / t
        ctx.mark_non_differentiable(plan.num_valid, cosines)
        # The statistics get no gradient: no zeros made for them in the backward.
        ctx.set_materialize_grads(False)
        return loss, plan.num_valid, cosines

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_num_valid, _grad_stats):
        # grad_loss is None when only the statistics were differentiated (no gradient).
        if not ctx.needs_input_grad[0] or grad_loss is None:
            return None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None


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
    max_dot: Optional[float] = None,
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
        plan: :func:`plan_region_contrast` (or :func:`plan_padded_contrast`) of these classes
            and memory, made earlier; the loss then reads no device value on the host.
        max_dot: a bound on |a . m| over every anchor and memory row that the caller guarantees
            (about 1 for unit vectors). When ``max_dot / temperature`` is small enough, the
            log-sum-exp needs no shift and the loss makes two fewer passes over the logits;
            the result is the same. A bound that does not hold can give inf or NaN.

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
            if plan is None:  # planned in the computation's dtype: its weights are exact there
                plan = plan_region_contrast(
                    anchor_classes, memory.detach().to(device=a.device, dtype=dtype), memory_classes
                )
            elif plan.cols.shape[0] != a.shape[0] or plan.memory.shape != memory.shape:
                raise ValueError(
                    f"the plan was made for {plan.cols.shape[0]} anchors and a memory of "
                    f"{tuple(plan.memory.shape)}, got {a.shape[0]} and {tuple(memory.shape)}"
                )
            m = plan.memory.detach().to(device=a.device, dtype=dtype)
            if plan.cols.device != a.device or plan.weight.dtype != dtype:
                moved = {k: getattr(plan, k).to(a.device)
                         for k in ("cols", "pad", "num_valid", "excluded")
                         if getattr(plan, k) is not None}
                moved.update({k: getattr(plan, k).to(a.device, dtype)
                              for k in ("weight", "pair_counts", "anchor_mask")
                              if getattr(plan, k) is not None})
                plan = plan._replace(**moved)
            loss, num_valid, cosines = _RegionContrastLoss.apply(
                a, m, plan, float(temperature), int(max_elements),
                None if max_dot is None else float(max_dot),
            )
            pos_cos, neg_cos = cosines.unbind()
            stats = {"pos_cos": pos_cos, "neg_cos": neg_cos, "num_valid": num_valid}
    if return_stats:
        return loss, stats
    return loss
