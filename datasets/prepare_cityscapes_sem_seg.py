#!/usr/bin/env python
"""
Writes the *_gtFine_labelTrainIds.png of Cityscapes (19 classes) next to the official polygons.

    python datasets/prepare_cityscapes_sem_seg.py [--workers N] [--no-progress]

Reads and writes under $DETECTRON2_DATASETS (default ./datasets); see datasets/README.md for the
downloads and the tree expected. Never modifies the official files; re-running skips what is
complete and completes an interrupted run. The mapping lives in region_contrast.data.cityscapes.
"""
import region_contrast  # noqa: F401  (compatibility aliases before Detectron2 is imported)
from region_contrast.data import cityscapes
from region_contrast.data.prepare import run_cli


def main(argv=None):
    return run_cli(cityscapes.prepare_cityscapes, __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    main()
