#!/usr/bin/env python
"""
Writes coco/coco_stuff_10k/{images,annotations}_detectron2 (171 classes) from COCO-Stuff-10k
(v1.1 or v1.0).

    python datasets/prepare_coco_stuff_10k_sem_seg.py [--workers N] [--no-progress]

Reads and writes under $DETECTRON2_DATASETS (default ./datasets); see datasets/README.md for the
downloads and the tree expected. Never modifies the official files; re-running skips what is
complete and completes an interrupted run. The mapping lives in region_contrast.data.coco_stuff.
"""
import region_contrast  # noqa: F401  (compatibility aliases before Detectron2 is imported)
from region_contrast.data import coco_stuff
from region_contrast.data.prepare import run_cli


def main(argv=None):
    return run_cli(coco_stuff.prepare_coco_stuff_10k, __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    main()
