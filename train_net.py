#!/usr/bin/env python
"""
Train and evaluate RegionContrast (and its Detectron2 baselines) for semantic segmentation.

    python train_net.py --config-file configs/DigitScenes/<recipe>.yaml [--num-gpus 8] \
        [KEY VALUE ...]
    python train_net.py --config-file <recipe>.yaml --num-gpus 8 --num-machines 2 \
        --machine-rank 0|1 --dist-url tcp://<machine 0>:<port>     # on each of two machines
    python train_net.py --config-file <recipe>.yaml --eval-only MODEL.WEIGHTS <checkpoint>.pth
    python train_net.py --config-file <recipe>.yaml --eval-only MODEL.WEIGHTS <checkpoint>.pth \
        TEST.AUG.ENABLED True        # also multi-scale + flip test-time augmentation

Glue only: ``main`` (train, resume or evaluate) is :func:`region_contrast.engine.main`.
"""
import region_contrast  # noqa: F401  (first: restores names Detectron2 v0.6 needs, registers)
from detectron2.engine import default_argument_parser, launch
from region_contrast.engine import check_launch, main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    check_launch(args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
