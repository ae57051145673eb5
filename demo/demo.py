#!/usr/bin/env python
"""
Segments images with a trained model and writes each one with its prediction drawn over it.

    python demo/demo.py --config-file configs/DigitScenes/<recipe>.yaml \\
        --input scene.png 'more/*.jpg' a_folder/ --output demo_out/ \\
        --opts MODEL.WEIGHTS output/<recipe>/model_final.pth

One PNG per input image, ``<output>/<input name without extension>.png``, at the input's size
times ``--scale`` (by default small images are enlarged to at least 512 px on their shorter side:
Detectron2's labels are at least 10 px high and would cover a 128 px scene): the image with each
predicted class painted in the colour of the data set's metadata
(``DATASETS.TEST[0]``: ``stuff_classes``, ``stuff_colors``) and labelled with its name. The model
runs through Detectron2's ``DefaultPredictor`` (resize to ``INPUT.MIN_SIZE_TEST``, channel order
of ``INPUT.FORMAT``) on ``MODEL.DEVICE``, or on the CPU when that names CUDA and none is present.
A RegionContrast checkpoint and its baseline predict the same way: the contrast is training-only.
"""
import argparse
import glob
import logging
import math
import os
import sys

from PIL import Image

import region_contrast  # noqa: F401  (compatibility aliases, data sets, the meta-architecture)
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from region_contrast.engine import load_config

logger = logging.getLogger("region_contrast.demo")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MIN_OVERLAY_SIDE = 512


def overlay_scale(height, width, scale=None):
    """``scale``, or the smallest whole factor that makes the shorter side >= MIN_OVERLAY_SIDE."""
    if scale is not None:
        return scale
    return float(max(1, math.ceil(MIN_OVERLAY_SIDE / min(height, width))))


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="the recipe the weights were trained with")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files, glob patterns (quote them: 'dir/*.png') or folders "
                             f"(their {'/'.join(IMAGE_EXTENSIONS)} files)")
    parser.add_argument("--output", required=True, metavar="FOLDER",
                        help="folder for the overlays (created if missing)")
    parser.add_argument("--alpha", type=float, default=0.6,
                        help="opacity of the class colours over the image, in [0, 1]")
    parser.add_argument("--scale", type=float, default=None,
                        help="size of the overlays relative to the inputs (default: the smallest "
                             f"whole factor giving at least {MIN_OVERLAY_SIDE} px on the shorter "
                             "side, 1 for larger images)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.WEIGHTS output/<recipe>/model_final.pth")
    return parser


def setup_cfg(args):
    """The recipe plus overrides, checked for weights, on the CPU when no GPU is present."""
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("Running on the CPU.")
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ValueError(
            f"MODEL.WEIGHTS is empty in {args.config_file}: the demo needs trained weights. "
            "Pass them with --opts MODEL.WEIGHTS output/<recipe>/model_final.pth"
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"MODEL.WEIGHTS = {weights!r} is not a file. Point it at a checkpoint written by "
            "train_net.py, e.g. output/<recipe>/model_final.pth"
        )
    return cfg


def expand_inputs(items):
    """
    Image paths from files, glob patterns and folders, in the order given (each pattern's and
    folder's matches sorted), without duplicates.

    Raises:
        FileNotFoundError: naming an item that matches no image file.
    """
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name) for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(item, name))
            )
            what = f"folder {item!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})"
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            what = f"pattern {item!r} matches no file"
        else:
            found = [item] if os.path.isfile(item) else []
            what = f"{item!r} is not a file"
        if not found:
            raise FileNotFoundError(
                f"--input: {what} (relative to {os.getcwd()}). Expected image files, glob "
                "patterns or folders of images."
            )
        paths.extend(found)
    unique = {}
    for path in paths:
        unique.setdefault(os.path.abspath(path), path)
    return list(unique.values())


def output_names(paths, output_dir):
    """``<output_dir>/<stem>.png`` for each input; a repeated stem gets ``-2``, ``-3``, ..."""
    taken, names = set(), []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = stem, 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        out = os.path.join(output_dir, name + ".png")
        if os.path.abspath(out) in {os.path.abspath(p) for p in paths}:
            raise ValueError(
                f"--output {output_dir!r} would overwrite the input {path!r}. Choose another "
                "--output folder."
            )
        names.append(out)
    return names


def load_image(path):
    """The image as Detectron2's loaders read it (EXIF orientation applied), BGR uint8."""
    try:
        return read_image(path, format="BGR")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ValueError, ...
        raise ValueError(
            f"--input: cannot read {path!r} as an image ({type(e).__name__}: {e}). Expected a "
            "PNG, JPEG, BMP, TIFF or WebP file; remove it from --input."
        ) from e


def class_metadata(cfg):
    """Metadata of ``DATASETS.TEST[0]``; numbered class names when it has none."""
    name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
    metadata = MetadataCatalog.get(name) if name else None
    if metadata is not None and metadata.get("stuff_classes", None):
        return metadata
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    logger.warning(
        "DATASETS.TEST[0] = %r has no stuff_classes metadata (is the data set registered?); "
        "classes are numbered 0..%d and coloured at random.", name, num_classes - 1,
    )
    return Metadata(name="numbered", stuff_classes=[str(i) for i in range(num_classes)])


def main(argv=None):
    """Runs the demo; returns the paths written."""
    args = get_parser().parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha = {args.alpha} is invalid: expected a number in [0, 1].")
    if args.scale is not None and not args.scale > 0:
        raise ValueError(f"--scale = {args.scale} is invalid: expected a number > 0.")
    setup_logger(name="fvcore")
    setup_logger()
    setup_logger(name="region_contrast")
    cfg = setup_cfg(args)
    paths = expand_inputs(args.input)
    os.makedirs(args.output, exist_ok=True)
    outputs = output_names(paths, args.output)

    from tqdm import tqdm

    predictor = DefaultPredictor(cfg)  # builds the model, loads MODEL.WEIGHTS, eval mode
    metadata = class_metadata(cfg)
    for path, out in tqdm(list(zip(paths, outputs)), desc="demo", unit="image"):
        image = load_image(path)
        # (K, H, W) scores at the input's size -> one class per pixel.
        labels = predictor(image)["sem_seg"].argmax(dim=0).to("cpu")
        scale = overlay_scale(*image.shape[:2], args.scale)
        visualizer = Visualizer(image[:, :, ::-1], metadata, scale=scale)  # it draws on RGB
        overlay = visualizer.draw_sem_seg(labels, alpha=args.alpha).get_image()
        # Written from the canvas's pixels, not savefig: exactly the input's size times the
        # scale, whatever the local matplotlib settings (savefig.dpi, savefig.bbox) say.
        Image.fromarray(overlay).save(out)
    logger.info("Wrote %d overlays to %s", len(outputs), os.path.abspath(args.output))
    return outputs


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
