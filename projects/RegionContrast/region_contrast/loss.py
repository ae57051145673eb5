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
logits right after its loss terms, in the forward; the backward only scales it. Positives are
few (one class out of many), so their terms are evaluated only at the positive pairs; the dense
work per chunk is one matmul, one masked log-sum-exp and, for the gradient, one exp and a second
matmul.

Pure tensor code: no config, no Detectron2, no I/O.
"""
from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["region_contrast_loss"]

_DEFAULT_MAX_ELEMENTS = 2**24


def _chunk_rows(num_anchors: int, num_memory: int, max_elements: int) -> int:
    return max(1, min(num_anchors, max_elements // max(num_memory, 1)))


def _chunk_terms(scaled_anchors, anchor_classes, memory, memory_classes):
    """
    Quantities shared by forward and backward, for a chunk of anchors already divided by t.

    Returns logits (a, M), positive mask (a, M), num_pos (a,), valid (a,), log_neg (a,) (-inf
    without negatives), and the positive pairs as (row, col, logit) (K,) each.
    """
    logits = scaled_anchors @ memory.t()
    positive = anchor_classes.unsqueeze(1) == memory_classes.unsqueeze(0)
    num_pos = positive.sum(dim=1)
    valid = (num_pos > 0) & (num_pos < memory_classes.numel())
    log_neg = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=1)
    rows, cols = torch.nonzero(positive, as_tuple=True)
    return logits, positive, num_pos, valid, log_neg, rows, cols, logits[rows, cols]


def _chunk_grad(logits, positive, num_pos, valid, log_neg, rows, cols, pos_logits, memory, t):
    """
    d(sum of the chunk's valid per-anchor losses)/d(anchors) for a chunk; overwrites ``logits``.

    With term_p = softplus(L - l_p):  d/dl_p = -sigmoid(L - l_p), d/dL = sigmoid(L - l_p), and
    dL/dl_n = softmax of the negatives' logits; l = a.m / t.
    """
    # Invalid rows get weight 0 below; a finite stand-in for their L_neg (the row max, so exp
    # never overflows) keeps them from turning into 0 * inf = NaN.
    log_neg = torch.where(valid, log_neg, logits.amax(dim=1))
    pos_weight = torch.sigmoid(log_neg[rows] - pos_logits)
    pos_weight /= num_pos[rows].to(pos_weight.dtype)
    neg_share = torch.zeros_like(log_neg).index_add_(0, rows, pos_weight)
    weight = logits.sub_(log_neg.unsqueeze(1)).exp_().masked_fill_(positive, 0.0)
    weight *= neg_share.unsqueeze(1)
    weight[rows, cols] = -pos_weight
    weight *= (valid.to(weight.dtype) / t).unsqueeze(1)
    return weight @ memory


class _RegionContrastLoss(torch.autograd.Function):
    """
    The loss and, in the same pass over the logits, its gradient with respect to the anchors
    (the memory is constant): the backward only scales that (A, D) gradient. Nothing of the
    size of the logits or the memory is kept for the backward, so the memory may be a view of
    the bank that is written to right after the loss.
    """

    @staticmethod
    def forward(ctx, anchors, anchor_classes, memory, memory_classes, temperature, max_elements):
        chunk = _chunk_rows(anchors.shape[0], memory.shape[0], max_elements)
        scaled = anchors / temperature
        total = anchors.new_zeros(())
        num_valid = torch.zeros((), dtype=torch.long, device=anchors.device)
        with_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(anchors) if with_grad else None
        # Sums and counts of positive / negative cosines, for logging.
        stats = anchors.new_zeros(4)
        for start in range(0, anchors.shape[0], chunk):
            terms = _chunk_terms(
                scaled[start : start + chunk],
                anchor_classes[start : start + chunk],
                memory,
                memory_classes,
            )
            logits, positive, num_pos, valid, log_neg, rows, cols, pos_logits = terms
            # -log(e^l / (e^l + e^L)) = softplus(L - l); an anchor without negatives (L = -inf)
            # adds exact zeros, and is excluded by `valid` anyway.
            per_pair = F.softplus(log_neg[rows] - pos_logits)
            per_anchor = torch.zeros_like(log_neg).index_add_(0, rows, per_pair)
            per_anchor /= num_pos.clamp(min=1).to(per_anchor.dtype)
            total += per_anchor.masked_fill_(~valid, 0.0).sum()
            num_valid += valid.sum()
            pos_sum = pos_logits.sum()
            num_pos_total = rows.numel()
            stats += torch.stack(
                [
                    pos_sum * temperature,
                    pos_sum.new_tensor(num_pos_total),
                    (logits.sum() - pos_sum) * temperature,
                    pos_sum.new_tensor(positive.numel() - num_pos_total),
                ]
            )
            if with_grad:  # last use of the chunk's logits: overwritten in place
                grad[start : start + chunk] = _chunk_grad(*terms, memory, temperature)
        denominator = num_valid.clamp(min=1).to(total.dtype)
        loss = total / denominator
        if with_grad:
            grad /= denominator
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(num_valid, stats)
        return loss, num_valid, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_num_valid, _grad_stats):
        if not ctx.needs_input_grad[0]:
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
        m = memory.detach().to(device=anchors.device, dtype=dtype)
        anchor_classes = anchor_classes.to(device=anchors.device, dtype=torch.long)
        memory_classes = memory_classes.to(device=anchors.device, dtype=torch.long)
        if a.shape[0] == 0 or m.shape[0] == 0:
            loss = a.sum() * 0.0
            nan = torch.full((), float("nan"), dtype=dtype, device=a.device)
            num_valid = torch.zeros((), dtype=torch.long, device=a.device)
            stats = {"pos_cos": nan, "neg_cos": nan.clone(), "num_valid": num_valid}
        else:
            loss, num_valid, sums = _RegionContrastLoss.apply(
                a, anchor_classes, m, memory_classes, float(temperature), int(max_elements)
            )
            stats = {
                "pos_cos": sums[0] / sums[1],  # 0/0 = NaN: no pairs of that kind
                "neg_cos": sums[2] / sums[3],
                "num_valid": num_valid,
            }
    if return_stats:
        return loss, stats
    return loss
