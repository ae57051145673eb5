"""
Region contrastive loss against a class-labelled memory (METHOD.md section 4).

For an anchor ``a`` of class ``c`` and temperature ``t``, positives ``P`` are the memory rows of
class ``c`` and negatives ``N`` the rows of other classes::

    loss(a) = -1/|P| sum_{p in P} log( exp(a.p/t) / (exp(a.p/t) + sum_{n in N} exp(a.n/t)) )
            =  1/|P| sum_{p in P} ( logaddexp(l_p, L_neg) - l_p ),   L_neg = logsumexp_{n in N} l_n

with ``l = a.m / t``; the result is the mean over anchors with ``|P| >= 1`` and ``|N| >= 1``.

Plain PyTorch, differentiated by autograd. The (anchors x memory) logits are computed in chunks
of anchors: with more than one chunk each chunk runs under ``torch.utils.checkpoint``, so autograd
keeps only the chunk's inputs and recomputes its logits in the backward, and memory stays
bounded however large the bank is.

Pure tensor code: no config, no Detectron2, no I/O.
"""
from typing import Dict, Tuple, Union

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["region_contrast_loss"]

# Logits computed at once at most (a chunk of anchors x the whole memory): 64 MiB in float32.
DEFAULT_MAX_ELEMENTS = 2**24


def _anchor_terms(anchors, anchor_classes, memory, memory_classes, temperature):
    """
    Per anchor: its loss (0 where it has no positive or no negative), whether it is valid, and
    the sums of its positive and of its negative cosines (for logging, no gradient needed).
    """
    logits = anchors @ memory.t() / temperature
    positive = anchor_classes.unsqueeze(1) == memory_classes.unsqueeze(0)
    num_pos = positive.sum(dim=1)
    has_neg = num_pos < memory.shape[0]
    # A row without negatives gets a finite stand-in, so that its (unused) gradient is not NaN.
    neg_logits = logits.masked_fill(positive | ~has_neg.unsqueeze(1), float("-inf"))
    neg_logits = torch.where(has_neg.unsqueeze(1), neg_logits, torch.zeros_like(logits))
    neg_lse = torch.logsumexp(neg_logits, dim=1, keepdim=True)
    terms = torch.logaddexp(logits, neg_lse) - logits
    per_anchor = torch.where(positive, terms, 0.0).sum(dim=1) / num_pos.clamp(min=1)
    valid = (num_pos > 0) & has_neg
    with torch.no_grad():
        cosines = logits.detach() * temperature
        pos_sum = torch.where(positive, cosines, 0.0).sum()
        neg_sum = cosines.sum() - pos_sum
    return torch.where(valid, per_anchor, 0.0), valid, pos_sum, neg_sum, num_pos.sum()


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
        if not parts:  # no anchor
            loss = a.sum() * 0.0
            nan = torch.full((), float("nan"), dtype=dtype, device=a.device)
            stats = {"pos_cos": nan, "neg_cos": nan.clone(),
                     "num_valid": torch.zeros((), dtype=torch.long, device=a.device)}
            return (loss, stats) if return_stats else loss
        per_anchor, valid, pos_sum, neg_sum, num_pos = (
            torch.cat(v) if v[0].dim() else torch.stack(v).sum() for v in zip(*parts)
        )
        num_valid = valid.sum()
        # With no valid anchor this is 0 * (a sum over the anchors): still in the graph for DDP.
        loss = per_anchor.sum() / num_valid.clamp(min=1)
    if not return_stats:
        return loss
    num_neg = a.shape[0] * m.shape[0] - num_pos
    stats = {
        "pos_cos": (pos_sum / num_pos).detach(),  # 0/0 = NaN: no pair of that kind
        "neg_cos": (neg_sum / num_neg).detach(),
        "num_valid": num_valid,
    }
    return loss, stats
