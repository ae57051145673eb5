#!/usr/bin/env python
"""
Writes ADEChallengeData2016/annotations_detectron2 (150 classes, 255 = ignore) from annotations/.

    python datasets/prepare_ade20k_sem_seg.py [--workers N] [--no-progress]

Reads and writes under $DETECTRON2_DATASETS (default ./datasets); see datasets/README.md for the
downloads and the tree expected. Never modifies the official files; re-running skips what is
complete and completes an interrupted run. The mapping lives in region_contrast.data.ade20k.
"""
import region_contrast  # noqa: F401  (compatibility aliases before Detectron2 is imported)
from region_contrast.data import ade20k
from region_contrast.data.prepare import run_cli


def main(argv=None):
    return run_cli(ade20k.prepare_ade20k, __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    main()
