"""
``ValidatingDatasetMapper``: Detectron2's ``DatasetMapper`` for semantic segmentation (and, for
Panoptic FPN, instances beside the semantic map), checking its input and padding small training
samples to the crop size.

Detectron2 v0.6 reads whatever it is given: label values outside the classes become wrong
targets (or a CUDA assert far from the cause), an image and label of different sizes fail with a
bare ``AssertionError`` inside a transform, and a truncated file fails without its name. Each of
these raises here, naming the file, the value found, what was expected and the fix. The checks
are vectorised and run on the decoded arrays the mapper reads anyway.

Training samples smaller than ``INPUT.CROP.SIZE`` are padded to it (the image with the pixel mean,
which the model normalises to 0 like its own batch padding; the label with the ignore value).
DeepLab's ASPP pools with a kernel fixed by the crop size, which a smaller input cannot hold.

A training sample with ``annotations`` (Detectron2's COCO panoptic "separated" data sets: COCO
instances plus the stuff-only semantic map) also gets ``instances``, made with the public
building blocks of ``detection_utils`` as Detectron2's custom-mapper tutorial does, under the
transforms the semantic map got (so the two stay aligned).
"""
import copy

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager

from .prepare import invalid_label_values

__all__ = [
    "ValidatingDatasetMapper",
    "read_image_checked",
    "read_label_checked",
    "check_label_values",
    "check_same_size",
]

_FIX_FILE = (
    "Fix: regenerate or re-download the data set with its prepare script under datasets/, "
    "or remove this sample from the split."
)


def read_image_checked(file_name, format=None, *, kind="image"):
    """``detection_utils.read_image``, naming the file when it is missing or cannot be decoded."""
    try:
        return utils.read_image(file_name, format=format)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{kind.capitalize()} file {file_name} listed by the data set does not exist. "
            f"{_FIX_FILE}"
        ) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises OSError (truncated, unidentified), SyntaxError (broken PNG chunks) or
        # ValueError (bad headers), none of which names the file.
        raise OSError(
            f"Cannot read {kind} file {file_name}: it is unreadable, truncated or corrupt "
            f"({type(e).__name__}: {e}); expected a complete image file. {_FIX_FILE}"
        ) from e


def read_label_checked(file_name):
    """
    A label map as an (H, W) array of class ids, read as ``DatasetMapper`` reads it (mode "L"),
    refusing colour images (whose grey levels are not class ids).
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            mode = Image.open(f).mode
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"Label file {file_name} listed by the data set does not exist. {_FIX_FILE}"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(
            f"Cannot read label file {file_name} ({type(e).__name__}: {e}); expected a complete "
            f"single-channel image of class ids. {_FIX_FILE}"
        ) from e
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        raise ValueError(
            f"Label file {file_name} is a {mode} image; expected a single-channel map of class "
            "ids (mode L). Colour-coded labels must be converted to class ids first: run the "
            "data set's prepare script under datasets/."
        )
    return read_image_checked(file_name, "L", kind="label").squeeze(2)


def check_label_values(label, num_classes, ignore_value, file_name):
    """
    Raises ValueError if ``label`` holds a value that is neither a class in
    ``[0, num_classes)`` nor ``ignore_value``, naming the file, the values and the fix.
    """
    values, counts = invalid_label_values(label, num_classes, ignore_value)
    if values.size:
        shown = ", ".join(f"{v} ({c} px)" for v, c in zip(values[:10].tolist(), counts[:10]))
        more = f" and {len(values) - 10} more" if len(values) > 10 else ""
        raise ValueError(
            f"Label file {file_name} has values {shown}{more} that are neither a class id in "
            f"[0, {num_classes - 1}] (MODEL.SEM_SEG_HEAD.NUM_CLASSES = {num_classes}) nor the "
            f"ignore value {ignore_value} (MODEL.SEM_SEG_HEAD.IGNORE_VALUE). Fix: convert the "
            "labels to training ids with the data set's prepare script, or set NUM_CLASSES and "
            "IGNORE_VALUE to match the data set."
        )


def check_same_size(image_shape, label_shape, image_file, label_file):
    """Raises ValueError if an image and its label map differ in height or width."""
    if tuple(image_shape[:2]) != tuple(label_shape[:2]):
        (ih, iw), (lh, lw) = image_shape[:2], label_shape[:2]
        raise ValueError(
            f"Image {image_file} is {iw}x{ih} (width x height) but its label map {label_file} "
            f"is {lw}x{lh}; expected the same size. Fix: regenerate the label map, or check that "
            "the data set pairs each image with its own label file."
        )


def _pad_to(tensor, size, value):
    """Pads a (C, H, W) or (H, W) tensor at the bottom and right to at least ``size`` (h, w)."""
    h, w = tensor.shape[-2:]
    if h >= size[0] and w >= size[1]:
        return tensor
    out = tensor.new_empty(tensor.shape[:-2] + (max(h, size[0]), max(w, size[1])))
    if tensor.dim() == 3:
        out[:] = torch.as_tensor(value, dtype=tensor.dtype).view(-1, 1, 1)
    else:
        out.fill_(value)
    out[..., :h, :w] = tensor
    return out


class ValidatingDatasetMapper(DatasetMapper):
    """
    :class:`DatasetMapper` for semantic segmentation that validates each sample (see the module
    docstring) and, in training with an absolute crop, pads samples smaller than the crop.
    Training samples with ``annotations`` also get ``instances`` (boxes, and masks with
    ``MODEL.MASK_ON``); precomputed proposals and keypoints are not supported.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations,
        image_format: str,
        num_classes: int,
        ignore_value: int = 255,
        pad_size=None,
        pad_pixel_value=(0, 0, 0),
        **kwargs,
    ):
        """
        Args:
            is_train, augmentations, image_format, kwargs: as for :class:`DatasetMapper`.
            num_classes, ignore_value: the valid label values are ``[0, num_classes)`` and
                ``ignore_value``.
            pad_size: (h, w) that training samples are padded to (bottom/right) when smaller;
                None disables padding.
            pad_pixel_value: per-channel value of padded image pixels.
        """
        super().__init__(is_train, augmentations=augmentations, image_format=image_format, **kwargs)
        self.num_classes = int(num_classes)
        self.ignore_value = int(ignore_value)
        self.pad_size = tuple(pad_size) if pad_size is not None else None
        self.pad_pixel_value = list(pad_pixel_value)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["num_classes"] = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        ret["ignore_value"] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        if is_train and cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute":
            ret["pad_size"] = tuple(cfg.INPUT.CROP.SIZE)
            # PIXEL_MEAN is in INPUT.FORMAT's channel order: padding normalises to 0.
            ret["pad_pixel_value"] = [
                int(np.clip(round(v), 0, 255)) for v in cfg.MODEL.PIXEL_MEAN
            ]
        return ret

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image_file = dataset_dict["file_name"]
        image = read_image_checked(image_file, format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        label = None
        label_file = dataset_dict.pop("sem_seg_file_name", None)
        if label_file is not None:
            label = read_label_checked(label_file)
            check_same_size(image.shape, label.shape, image_file, label_file)
            check_label_values(label, self.num_classes, self.ignore_value, label_file)

        aug_input = T.AugInput(image, sem_seg=label)
        transforms = self.augmentations(aug_input)
        image, label = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]  # before padding: the instances' frame

        image = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            label = torch.as_tensor(label.astype("long"))
        if self.is_train and self.pad_size is not None:
            image = _pad_to(image, self.pad_size, self.pad_pixel_value)
            if label is not None:
                label = _pad_to(label, self.pad_size, self.ignore_value)

        dataset_dict["image"] = image
        if label is not None:
            dataset_dict["sem_seg"] = label
        annotations = dataset_dict.pop("annotations", None)
        if self.is_train and annotations is not None:
            dataset_dict["instances"] = self.instances(annotations, transforms, image_shape)
        return dataset_dict

    def instances(self, annotations, transforms, image_shape):
        """
        Detectron2 ``Instances`` of a sample's non-crowd ``annotations`` after ``transforms``,
        in an image of ``image_shape`` (h, w); instances left empty by a crop are dropped.
        """
        if self.use_keypoint:
            raise ValueError(
                "ValidatingDatasetMapper does not map keypoints (MODEL.KEYPOINT_ON is True); "
                "use Detectron2's DatasetMapper for keypoint models."
            )
        objects = []
        for obj in annotations:
            if obj.get("iscrowd", 0):
                continue
            obj = dict(obj)
            obj.pop("keypoints", None)
            if not self.use_instance_mask:
                obj.pop("segmentation", None)
            objects.append(utils.transform_instance_annotations(obj, transforms, image_shape))
        instances = utils.annotations_to_instances(
            objects, image_shape, mask_format=self.instance_mask_format
        )
        if self.recompute_boxes and instances.has("gt_masks"):
            # A crop cuts boxes loosely; the cut masks give the tight ones.
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        return utils.filter_empty_instances(instances)
