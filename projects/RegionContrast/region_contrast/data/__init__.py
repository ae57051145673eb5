"""Data sets of the project; importing registers them in Detectron2's catalogs.

- ``digit_scenes``: the embedded DigitScenes set (``digit_scenes_{train,val}``).
- ``cityscapes``, ``ade20k``, ``coco_panoptic``: Detectron2's builtin Cityscapes, ADE20K and COCO
  panoptic stuffonly names, re-registered with the same records and clearer missing-data errors;
  ``coco_panoptic`` also registers the 133-class ``coco_2017_{train,val}_panoptic_sem_seg``.
- ``coco_stuff``: COCO-Stuff-164k and COCO-Stuff-10k (171 classes).
- ``prepare``: the shared machinery of the prepare scripts in ``datasets/``.
"""
from . import digit_scenes  # noqa: F401
from . import ade20k, cityscapes, coco_panoptic, coco_stuff  # noqa: F401
