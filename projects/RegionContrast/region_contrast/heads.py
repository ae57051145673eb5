"""
DeepLab heads that also hand out the feature map their classifier reads.

They subclass the DeepLab project's heads and add no parameter, so their state dicts, outputs
and evaluation path are the parents'. Only ``forward_features`` is new, and ``losses`` differs
from the parents' in one degenerate case: a batch whose pixels are all ignored.
"""
from contextlib import contextmanager

from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab import DeepLabV3Head, DeepLabV3PlusHead

__all__ = ["RegionContrastDeepLabV3PlusHead", "RegionContrastDeepLabV3Head"]


class _AllIgnoreSafeLoss:
    """
    The parents' ``cross_entropy`` loss is a mean over non-ignored pixels, 0/0 = NaN for a batch
    with none (Detectron2 then stops training with FloatingPointError). Such a batch gets a zero
    that keeps every parameter in the graph (DDP needs them all used); any other batch gets the
    parents' loss unchanged. ``hard_pixel_mining`` already gives 0 there.
    """

    def losses(self, predictions, targets):
        if self.loss_type == "cross_entropy" and not bool((targets != self.ignore_value).any()):
            return {"loss_sem_seg": predictions.sum() * 0.0}
        return super().losses(predictions, targets)


@SEM_SEG_HEADS_REGISTRY.register()
class RegionContrastDeepLabV3PlusHead(_AllIgnoreSafeLoss, DeepLabV3PlusHead):
    """:class:`DeepLabV3PlusHead` that can also return the decoder's penultimate feature map."""

    @contextmanager
    def _decoder_only(self):
        # The parent's ``layers`` stops before the predictor when ``decoder_only`` is set; reusing
        # it keeps one decoder implementation (the DeepLab project's).
        saved, self.decoder_only = self.decoder_only, True
        try:
            yield
        finally:
            self.decoder_only = saved

    def forward_features(self, features):
        """
        Returns:
            logits (N, K, H/s, W/s) and the feature map (N, D, H/s, W/s) the predictor reads,
            both at the decoder's stride ``s = common_stride``. Pass the logits to
            ``self.losses`` for the head's own loss.
        """
        with self._decoder_only():
            embedding = self.layers(features)
        return self.predictor(embedding), embedding


@SEM_SEG_HEADS_REGISTRY.register()
class RegionContrastDeepLabV3Head(_AllIgnoreSafeLoss, DeepLabV3Head):
    """:class:`DeepLabV3Head` that can also return the ASPP output its predictor reads."""

    def forward_features(self, features):
        """Returns (logits, ASPP features), both at the head's stride."""
        embedding = self.aspp(features[self.in_features[0]])
        return self.predictor(embedding), embedding
