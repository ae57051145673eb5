"""
Region contrastive loss against a class-labelled memory (docs/method.md, section 4).

For an anchor ``a`` of class ``c`` and temperature ``t``, positives ``P`` are the memory rows of
class ``c`` and negatives ``N`` the rows of other classes::

    loss(a) = -1/|P| sum_{p in P} log( exp(a.p/t) / (exp(a.p/t) + sum_{n in N} exp(a.n/t)) )
            =  1/|P| sum_{p in P} softplus(L_neg - l_p),   L_neg = logsumexp_{n in N} l_n

with ``l = a.m / t``; the result is the mean over anchors with ``|P| >= 1`` and ``|N| >= 1``.

Plain PyTorch, differentiated by autograd. The (anchors x memory) logits are computed in chunks
of anchors: with more than one chunk each chunk runs under ``torch.utils.checkpoint``, so autograd
keeps only the chunk's inputs and recomputes its logits in the backward, and memory stays
bounded however large the bank is.

Pure tensor code: no config, no Detectron2, no I/O.
"""
from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["region_contrast_loss"]

# Logits computed at once at most (a chunk of anchors x the whole memory): 64 MiB in float32.
DEFAULT_MAX_ELEMENTS = 2**24


def _anchor_terms(anchors, anchor_classes, memory, memory_classes, temperature):
    """Per anchor: its loss (0 where it has no positive or no negative) and whether it is valid."""
    logits = (anchors / temperature) @ memory.t()
    positive = anchor_classes.unsqueeze(1) == memory_classes.unsqueeze(0)
    # Positives are left out of the negatives' log-sum-exp with the most negative finite value
    # rather than -inf: a row without negatives then gets a finite (unused) result and gradient.
    neg_lse = torch.logsumexp(logits.masked_fill(positive, torch.finfo(logits.dtype).min), dim=1)
    # -log(e^l / (e^l + e^L)) = softplus(L - l), for the (anchor, positive) pairs only.
    rows, cols = positive.nonzero(as_tuple=True)
    terms = F.softplus(neg_lse[rows] - logits[rows, cols])
    num_pos = torch.bincount(rows, minlength=anchors.shape[0])
    per_anchor = torch.zeros_like(neg_lse).index_add(0, rows, terms) / num_pos.clamp(min=1)
    valid = (num_pos > 0) & (num_pos < memory.shape[0])
    return torch.where(valid, per_anchor, 0.0), valid


def _mean_cosines(anchors, anchor_classes, memory, memory_classes):
    """
    Mean cosine over all anchor-positive and all anchor-negative pairs (NaN when there is no
    pair of a kind), from the memory's per-class sums: sum_p a.p = a . (sum of class c's rows).
    """
    num_classes = int(max(anchor_classes.max(), memory_classes.max())) + 1
    class_sums = memory.new_zeros(num_classes, memory.shape[1]).index_add_(
        0, memory_classes, memory)
    class_counts = torch.bincount(memory_classes, minlength=num_classes)
    pos_sum = (anchors * class_sums[anchor_classes]).sum()
    all_sum = (anchors @ class_sums.sum(dim=0)).sum()
    num_pos = class_counts[anchor_classes].sum()
    num_neg = anchors.shape[0] * memory.shape[0] - num_pos
    return pos_sum / num_pos, (all_sum - pos_sum) / num_neg


def region_contrast_loss(
    anchors: torch.Tensor,
    anchor_classes: torch.Tensor,
    memory: torch.Tensor,
    memory_classes: torch.Tensor,
    temperature: float,
    *,
    return_stats: bool = False,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
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
    # float32 whatever autocast does: half-precision exp at t = 0.1 is too coarse.
    dtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a = anchors.to(dtype)
        m = memory.detach().to(device=a.device, dtype=dtype)
        a_cls = anchor_classes.to(device=a.device, dtype=torch.long)
        m_cls = memory_classes.to(device=a.device, dtype=torch.long)
        chunk = max(1, max_elements // max(m.shape[0], 1))
        parts = []
        for lo in range(0, a.shape[0], chunk):
            args = (a[lo : lo + chunk], a_cls[lo : lo + chunk], m, m_cls, float(temperature))
            if chunk < a.shape[0] and a.requires_grad:
                parts.append(checkpoint(_anchor_terms, *args, use_reentrant=False))
            else:
                parts.append(_anchor_terms(*args))
        if parts:
            per_anchor, valid = (torch.cat(v) for v in zip(*parts))
        else:  # no anchor
            per_anchor, valid = a.sum(dim=1), a.new_zeros(0, dtype=torch.bool)
        num_valid = valid.sum()
        # With no valid anchor this is 0 * (a sum over the anchors): still in the graph for DDP.
        loss = per_anchor.sum() / num_valid.clamp(min=1)
        if not return_stats:
            return loss
        with torch.no_grad():
            if a.shape[0] and m.shape[0]:
                pos_cos, neg_cos = _mean_cosines(a, a_cls, m, m_cls)
            else:
                pos_cos = neg_cos = torch.full((), float("nan"), dtype=dtype, device=a.device)
    return loss, {"pos_cos": pos_cos, "neg_cos": neg_cos, "num_valid": num_valid}
