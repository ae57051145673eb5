#!/usr/bin/env python
"""
Writes coco/panoptic_stuff_* (54 classes) and coco/panoptic_semseg_* (133) from COCO panoptic.

    python datasets/prepare_coco_panoptic_stuff_sem_seg.py [--workers N] [--no-progress]

Reads and writes under $DETECTRON2_DATASETS (default ./datasets); see datasets/README.md for the
downloads and the tree expected. Never modifies the official files; re-running skips what is
complete and completes an interrupted run. The mapping lives in region_contrast.data.coco_panoptic.
"""
import region_contrast  # noqa: F401  (compatibility aliases before Detectron2 is imported)
from region_contrast.data import coco_panoptic
from region_contrast.data.prepare import run_cli


def main(argv=None):
    return run_cli(coco_panoptic.prepare_coco_panoptic_stuff, __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    main()
