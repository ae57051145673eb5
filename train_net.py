#!/usr/bin/env python
"""
Train and evaluate RegionContrast (and its Detectron2 baselines) for semantic segmentation.

    python train_net.py --config-file configs/DigitScenes/<recipe>.yaml [--num-gpus 8] \
        [KEY VALUE ...]
    python train_net.py --config-file <recipe>.yaml --eval-only MODEL.WEIGHTS <checkpoint>.pth
    python train_net.py --config-file <recipe>.yaml --eval-only MODEL.WEIGHTS <checkpoint>.pth \
        TEST.AUG.ENABLED True        # also multi-scale + flip test-time augmentation
"""
import region_contrast  # noqa: F401  (registers data sets, heads, the meta-architecture)
from detectron2.engine import default_argument_parser, launch
from region_contrast.engine import Trainer, setup
from region_contrast.engine.checkpoint import AtomicDetectionCheckpointer


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train() returns the final evaluation only with TEST.EXPECTED_RESULTS set.
    return getattr(trainer, "_last_eval_results", None)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
