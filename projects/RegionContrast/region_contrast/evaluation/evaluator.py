"""
Detectron2's semantic-segmentation evaluators, with a clear error on bad ground truth.

Detectron2's ``SemSegEvaluator`` adds ``(K + 1) * pred + gt`` into a ``(K + 1)^2`` confusion
matrix: a ground-truth value outside ``[0, K)`` that is not the ignore label is silently counted
in another cell, or fails with a reshape error. :class:`ValidatingSemSegEvaluator` checks each
ground-truth map first (which file, which values, what was expected, the fix) and then hands the
batch to the parent's ``process`` unchanged, so every metric is the installed Detectron2's own
(boundary IoU and ``sem_seg_loading_fn`` on Detectron2 main, the plain metrics on v0.6).
"""
import numpy as np
from PIL import Image

from detectron2.evaluation import CityscapesSemSegEvaluator, SemSegEvaluator
from detectron2.utils.file_io import PathManager

from ..compat import alias_cityscapes_api
from ..data.mapper import check_label_values

__all__ = ["ValidatingSemSegEvaluator", "OfficialCityscapesSemSegEvaluator"]


class ValidatingSemSegEvaluator(SemSegEvaluator):
    """
    :class:`SemSegEvaluator` that validates each ground-truth map before the parent reads it.

    ``result_key`` names the task in the returned results (``"sem_seg"``, Detectron2's); another
    name lets it report beside an evaluator that also says ``sem_seg``, as Cityscapes' does.
    The check reads each ground-truth file once more than the parent does: one image decode
    per evaluated image, small beside the model's forward.
    """

    def __init__(self, dataset_name, distributed=True, output_dir=None, *, result_key="sem_seg",
                 **kwargs):
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir, **kwargs)
        self._result_key = result_key

    def _check_gt(self, gt_file, pred_shape, input_file):
        try:
            with PathManager.open(gt_file, "rb") as f:
                gt = np.asarray(Image.open(f))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"Ground-truth file {gt_file} of data set '{self._dataset_name}' does not exist. "
                "Fix: regenerate or re-download the data set with its prepare script under "
                "datasets/."
            ) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise OSError(
                f"Cannot read ground-truth file {gt_file} of data set '{self._dataset_name}' "
                f"({type(e).__name__}: {e}); expected a complete single-channel image of class "
                "ids. Fix: regenerate or re-download the data set with its prepare script."
            ) from e
        if gt.ndim != 2:
            raise ValueError(
                f"Ground-truth file {gt_file} of data set '{self._dataset_name}' has shape "
                f"{gt.shape}; expected a single-channel (H, W) map of class ids. Fix: convert "
                "colour-coded labels to class ids with the data set's prepare script."
            )
        check_label_values(gt, self._num_classes, self._ignore_label, gt_file)
        if gt.shape != tuple(pred_shape):
            raise ValueError(
                f"Prediction for {input_file} is {pred_shape[1]}x{pred_shape[0]} "
                f"(width x height) but its ground truth {gt_file} is {gt.shape[1]}x"
                f"{gt.shape[0]}; expected the same size. Fix: check the data set's "
                "'height'/'width' fields and that each image is paired with its own label."
            )

    def process(self, inputs, outputs):
        for inp, output in zip(inputs, outputs):
            gt_file = self.input_file_to_gt_file[inp["file_name"]]
            self._check_gt(gt_file, output["sem_seg"].shape[-2:], inp["file_name"])
        super().process(inputs, outputs)

    def evaluate(self):
        results = super().evaluate()
        if results is None or self._result_key == "sem_seg":  # None: not the main process
            return results
        return {self._result_key: results["sem_seg"]}


class OfficialCityscapesSemSegEvaluator(CityscapesSemSegEvaluator):
    """
    Detectron2's :class:`CityscapesSemSegEvaluator` (the official cityscapesscripts metrics,
    reported under Detectron2's key ``sem_seg``), also where the installed Detectron2 imports
    cityscapesscripts under a path that only exists inside Meta (Detectron2 main, upstream
    issue 5436): see :func:`region_contrast.compat.alias_cityscapes_api`.
    """

    def __init__(self, dataset_name):
        alias_cityscapes_api()
        super().__init__(dataset_name)
