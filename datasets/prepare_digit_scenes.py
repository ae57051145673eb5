#!/usr/bin/env python
"""
Generates the DigitScenes semantic-segmentation data set under $DETECTRON2_DATASETS/digit_scenes
(default ./datasets/digit_scenes). Resumable and idempotent; see region_contrast.data.digit_scenes.

    python datasets/prepare_digit_scenes.py [--num-train 2000] [--num-val 500] [--num-test 500]
                                            [--size 128] [--seed 0]
"""
import argparse
import os
import sys
import time

import region_contrast  # noqa: F401  (compatibility aliases before Detectron2 is imported)
from region_contrast.data import digit_scenes


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--size", type=int, default=128, help="side of the square scenes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    start = time.perf_counter()
    try:
        out = digit_scenes.generate_digit_scenes(
            root, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
            size=args.size, seed=args.seed,
        )
    except digit_scenes.DigitScenesMismatchError as e:
        sys.exit(f"error: {e}")
    print(f"DigitScenes in {os.path.abspath(out)} ({time.perf_counter() - start:.1f} s)")
    for split in digit_scenes.SPLITS:
        image_dir = os.path.join(out, "images", split)
        count = sum(n.endswith(".png") for n in os.listdir(image_dir))
        freqs, ignored = digit_scenes.class_pixel_frequencies(out, split)
        table = ", ".join(
            f"{c}={f:.2%}" for c, f in zip(digit_scenes.DIGIT_SCENES_CLASSES, freqs)
        )
        print(f"  {split}: {count} scenes; pixel frequencies: {table}, ignore={ignored:.2%}")


if __name__ == "__main__":
    main()
