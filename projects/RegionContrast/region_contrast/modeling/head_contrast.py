"""
Region contrast around any Detectron2 semantic head (docs/method.md, section 8).

Every semantic head keeps the same training contract: ``forward(features, targets)`` returns
``(None, losses)``, and the meta-architecture (``SemanticSegmentor``, ``PanopticFPN``, ...) merges
the dict. The head's classifier (a module, ``predictor`` in Detectron2's and the DeepLab
project's heads) reads the feature map the method contrasts. So the contrast needs no new head
and no new meta-architecture: :func:`add_region_contrast` registers a
:class:`RegionContrastCriterion` as the head's submodule ``region_contrast`` and two forward
hooks, Detectron2's documented way to read intermediate features:

- on the classifier: during a training forward, keep its input (the features) and its output;
- on the head: after the head has computed what it always computes, hand those features and the
  targets to the criterion, add ``loss_contrast`` to the head's losses and push the step's
  region centres into the bank.

In evaluation both hooks return at once, so outputs are the plain head's. The head's parameters
keep their names: a checkpoint loads into the plain architecture with only ``region_contrast.*``
unused. This module is the only one that knows training from evaluation.

In a recipe: ``MODEL.SEM_SEG_HEAD.NAME: "RegionContrastHead"`` and
``MODEL.REGION_CONTRAST.HEAD_NAME`` the head to build (see :func:`RegionContrastHead`).
"""
import logging
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .criterion import RegionContrastCriterion
from .regions import check_labels

__all__ = [
    "RegionContrastHead",
    "add_region_contrast",
    "add_region_contrast_from_config",
    "classifier_input",
    "find_region_contrast",
]

logger = logging.getLogger(__name__)

FEATURE_KEY = "MODEL.REGION_CONTRAST.FEATURE_MODULE"


def _feature_module(head: nn.Module, path: str) -> nn.Module:
    """The submodule ``path`` of ``head``, or a ValueError that lists the candidates."""
    try:
        return head.get_submodule(path)
    except AttributeError:
        candidates = [name for name, m in head.named_modules()
                      if name and isinstance(m, nn.Conv2d)]
        raise ValueError(
            f"{FEATURE_KEY} = {path!r}: {type(head).__name__} has no such submodule. Name the "
            f"module whose input is the feature map the classifier reads; its convolutions are "
            f"{candidates}."
        ) from None


def _targets(args, kwargs):
    """The head's ``targets``: the second positional argument, as meta-architectures pass it."""
    return args[1] if len(args) > 1 else kwargs.get("targets")


class _HeadContrast:
    """
    The two hooks and what passes between them within one training forward of the head. Not a
    module: the criterion is the head's submodule, this object only holds references.
    """

    def __init__(self, criterion: RegionContrastCriterion, feature_module: str):
        self.criterion = criterion
        self.feature_module = feature_module
        # (features, classifier output) pairs of the current training forward; None otherwise.
        self.seen = None

    def before_head(self, head, args, kwargs):
        self.seen = None
        if not head.training:
            return None
        targets = _targets(args, kwargs)
        if not isinstance(targets, torch.Tensor) or targets.dim() != 3:
            raise ValueError(
                f"region contrast on {type(head).__name__}: a training forward needs the targets "
                f"(N, H, W) as the head's second argument, got {type(targets).__name__}"
                + (f" of shape {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else "")
            )
        # Before the head's own loss: cross entropy would fail on such a label without naming it.
        check_labels(targets, self.criterion.num_classes, self.criterion.ignore_value)
        self.seen = []
        return None

    def keep_features(self, module, args, output):
        if self.seen is not None:
            self.seen.append((args[0] if args else None, output))

    def after_head(self, head, args, kwargs, output):
        seen, self.seen = self.seen, None
        if seen is None:  # evaluation: the head's outputs, untouched
            return None
        name = type(head).__name__
        if len(seen) != 1:
            raise RuntimeError(
                f"{FEATURE_KEY} = {self.feature_module!r} ran {len(seen)} times in one training "
                f"forward of {name}; region contrast needs the module that runs exactly once and "
                "reads the feature map the classifier sees. Set that key to its path in the head."
            )
        features, logits = seen[0]
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else features
            raise RuntimeError(
                f"{FEATURE_KEY} = {self.feature_module!r} of {name} reads {shape}, not an "
                "(N, C, H, W) feature map. Set that key to the module whose input is the map."
            )
        if not (isinstance(output, (tuple, list)) and len(output) == 2
                and isinstance(output[1], dict)):
            raise TypeError(
                f"region contrast on {name}: a training forward must return (predictions, "
                f"losses dict) as Detectron2's semantic heads do, got {type(output).__name__}"
            )
        if not (isinstance(logits, torch.Tensor) and logits.shape[-2:] == features.shape[-2:]):
            logits = None  # only REGION_SOURCE "pred" and pixel anchors need them (they say so)
        targets = _targets(args, kwargs)
        contrast = self.criterion(features, targets, logits)
        losses = dict(output[1])
        losses["loss_contrast"] = contrast.loss
        # Nothing of a step whose loss is not finite enters the bank: Detectron2 stops with
        # FloatingPointError right after, and the bank must stay clean.
        finite = bool(torch.isfinite(sum(losses.values()).detach()))
        self.criterion.update(contrast, accept=finite)
        return output[0], losses


def add_region_contrast(
    head: nn.Module, criterion: RegionContrastCriterion, *, feature_module: str = "predictor"
) -> nn.Module:
    """
    Trains ``head`` with ``criterion`` from now on (see the module's docstring); returns ``head``.

    Args:
        head: a semantic head with Detectron2's contract (``forward(features, targets)``
            returning ``(predictions, losses)`` in training).
        criterion: becomes the head's submodule ``region_contrast``.
        feature_module: path in ``head`` of the module whose input (N, C, H, W) is contrasted.
    """
    if find_region_contrast(head) is not None:
        raise ValueError(f"{type(head).__name__} already has region contrast")
    if hasattr(head, "region_contrast"):
        raise ValueError(f"{type(head).__name__} already has an attribute 'region_contrast'")
    hooks = _HeadContrast(criterion, feature_module)
    _feature_module(head, feature_module).register_forward_hook(hooks.keep_features)
    head.add_module("region_contrast", criterion)
    head.register_forward_pre_hook(hooks.before_head, with_kwargs=True)
    head.register_forward_hook(hooks.after_head, with_kwargs=True)
    return head


def add_region_contrast_from_config(head: nn.Module, cfg) -> nn.Module:
    """
    ``head`` with the contrast of ``cfg.MODEL.REGION_CONTRAST`` added when ``ENABLED``; else
    ``head`` unchanged.
    """
    rc = cfg.MODEL.REGION_CONTRAST
    if not rc.ENABLED:
        return head
    classifier = _feature_module(head, rc.FEATURE_MODULE)
    width = getattr(classifier, "in_channels", None)
    if not isinstance(width, int):
        raise ValueError(
            f"{FEATURE_KEY} = {rc.FEATURE_MODULE!r} is a {type(classifier).__name__} without "
            "an integer `in_channels`, so the width of the features it reads is unknown. Name a "
            "convolution (nn.Conv2d) whose input is the feature map."
        )
    criterion = RegionContrastCriterion(cfg, width)
    bank = criterion.memory_bank
    logger.info(
        f"RegionContrast on {type(head).__name__}.{rc.FEATURE_MODULE}: memory bank "
        f"{bank.num_classes} classes x {bank.size} slots x {bank.dim} dims in {bank.dtype} = "
        f"{bank.nbytes / 2**20:.1f} MiB"
    )
    return add_region_contrast(head, criterion, feature_module=rc.FEATURE_MODULE)


@SEM_SEG_HEADS_REGISTRY.register()
def RegionContrastHead(cfg, input_shape):
    """
    Builds the semantic head named by ``MODEL.REGION_CONTRAST.HEAD_NAME`` and, with
    ``MODEL.REGION_CONTRAST.ENABLED``, adds region contrast to it. Disabled, the result is that
    head exactly (same type, parameters and outputs).
    """
    name = cfg.MODEL.REGION_CONTRAST.HEAD_NAME
    if name == "RegionContrastHead":
        raise ValueError(
            "MODEL.REGION_CONTRAST.HEAD_NAME = 'RegionContrastHead' would wrap itself: name the "
            "semantic head to train, e.g. 'SemSegFPNHead' or 'DeepLabV3PlusHead'."
        )
    try:
        builder = SEM_SEG_HEADS_REGISTRY.get(name)
    except KeyError:
        raise ValueError(
            f"MODEL.REGION_CONTRAST.HEAD_NAME = {name!r} is not a registered semantic head; "
            f"registered: {sorted(k for k, _ in SEM_SEG_HEADS_REGISTRY)}. Import the module that "
            "registers yours before building the model."
        ) from None
    head = builder(cfg, input_shape)
    if find_region_contrast(head) is not None:  # one of this project's heads added it already
        return head
    return add_region_contrast_from_config(head, cfg)


def find_region_contrast(model: nn.Module) -> Optional[RegionContrastCriterion]:
    """The model's :class:`RegionContrastCriterion` (DDP-wrapped or not), or None."""
    for module in model.modules():
        if isinstance(module, RegionContrastCriterion):
            return module
    return None


@contextmanager
def classifier_input(head: nn.Module, feature_module: str = "predictor"):
    """
    Within the block, the returned list receives the input of ``head``'s ``feature_module`` at
    each call, in any mode: how diagnostics read the features the contrast acts on.
    """
    seen = []
    handle = _feature_module(head, feature_module).register_forward_hook(
        lambda module, args, output: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()
