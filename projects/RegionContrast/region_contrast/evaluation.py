"""
``ValidatingSemSegEvaluator``: Detectron2's ``SemSegEvaluator`` that refuses bad ground truth.

Detectron2 v0.6 adds ``(K + 1) * pred + gt`` into a ``(K + 1)^2`` confusion matrix: a ground-truth
value ``v`` outside ``[0, K)`` that is not the ignore label is silently counted in another cell
(row ``pred + (v // (K + 1))``), or fails with a reshape error. Here each ground-truth map is
checked as it is read (one vectorised pass), and an error names the file, the values, what was
expected and the fix. Everything else (metrics, outputs) is the parent's.
"""
import numpy as np
from PIL import Image

from detectron2.evaluation import CityscapesSemSegEvaluator, SemSegEvaluator
from detectron2.utils.file_io import PathManager

from .data.mapper import check_label_values

__all__ = ["ValidatingSemSegEvaluator", "CityscapesOfficialSemSegEvaluator"]


class ValidatingSemSegEvaluator(SemSegEvaluator):
    """:class:`SemSegEvaluator` whose ``process`` validates each ground-truth map it reads."""

    def _read_gt(self, gt_file):
        try:
            with PathManager.open(gt_file, "rb") as f:
                gt = np.array(Image.open(f), dtype=np.int64)
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
        return gt

    def process(self, inputs, outputs):
        k1 = self._num_classes + 1
        for inp, output in zip(inputs, outputs):
            pred = output["sem_seg"].argmax(dim=0).to(self._cpu_device).numpy().astype(np.int64)
            gt_file = self.input_file_to_gt_file[inp["file_name"]]
            gt = self._read_gt(gt_file)
            if gt.shape != pred.shape:
                raise ValueError(
                    f"Prediction for {inp['file_name']} is {pred.shape[1]}x{pred.shape[0]} "
                    f"(width x height) but its ground truth {gt_file} is {gt.shape[1]}x"
                    f"{gt.shape[0]}; expected the same size. Fix: check the data set's "
                    "'height'/'width' fields and that each image is paired with its own label."
                )
            gt[gt == self._ignore_label] = self._num_classes
            self._conf_matrix += np.bincount(
                k1 * pred.reshape(-1) + gt.reshape(-1), minlength=k1 * k1
            ).reshape(k1, k1)
            self._predictions.extend(self.encode_json_sem_seg(pred, inp["file_name"]))


class CityscapesOfficialSemSegEvaluator(CityscapesSemSegEvaluator):
    """
    Detectron2's :class:`CityscapesSemSegEvaluator` (the official cityscapesscripts metrics),
    reporting under the task ``cityscapes_sem_seg``: it and :class:`SemSegEvaluator` both say
    ``sem_seg``, and ``DatasetEvaluators`` refuses two evaluators with the same key.
    """

    def evaluate(self):
        results = super().evaluate()
        if results is None:  # not the main process
            return results
        return {"cityscapes_sem_seg": results["sem_seg"]}
