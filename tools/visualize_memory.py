#!/usr/bin/env python
"""
Pictures of what a RegionContrast checkpoint's memory bank holds.

    python tools/visualize_memory.py output/<recipe>/model_final.pth \\
        --config-file configs/DigitScenes/<recipe>.yaml --output output/<recipe>/memory
    python tools/visualize_memory.py <checkpoint>.pth --output <folder> --method tsne

Writes two figures (800x600 pixels) into ``--output``:

- ``memory_projection.png``: the bank's filled entries (L2-normalised, at most
  ``--max-per-class`` per class, evenly strided) projected to 2-D, one colour per class;
  ``--method pca`` (default, deterministic) or ``tsne`` (needs scikit-learn);
- ``memory_similarity.png``: cosine similarity between the classes' mean directions (entries
  normalised, averaged, normalised again), classes without entries left blank. Well-separated
  classes show a red diagonal on a blue-to-white background.

``--config-file`` supplies the class names and colours (the metadata of its ``DATASETS.TEST[0]``,
``--opts`` overrides applied); without it classes are numbered. The same figures go to
TensorBoard during training when ``TEST.EVAL_PERIOD > 0`` (``region_contrast/memory_*``).
"""
import argparse
import os
import sys

import torch
from PIL import Image

import region_contrast  # noqa: F401  (compatibility aliases, data sets)
from detectron2.data import MetadataCatalog
from region_contrast.engine import load_config
from region_contrast.visualisation.memory_plots import memory_summary_images
from region_contrast.visualisation.memory_summary import bank_from_state_dict


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoint", help="a .pth written by train_net.py (e.g. model_final.pth)")
    parser.add_argument("--output", required=True, metavar="FOLDER",
                        help="folder for memory_projection.png and memory_similarity.png")
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="the recipe of the checkpoint, for class names and colours")
    parser.add_argument("--method", choices=["pca", "tsne"], default="pca",
                        help="2-D projection: pca (deterministic) or tsne (scikit-learn)")
    parser.add_argument("--max-per-class", type=int, default=500, metavar="N",
                        help="entries per class in the projection, 0 for all (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="random state of t-SNE")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                        help="config overrides, e.g. DATASETS.TEST \"('my_val',)\"")
    return parser


def load_model_state(path):
    """The model state dict of a checkpoint (its ``"model"`` entry, or the file itself)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} is not a file. Expected a .pth written by train_net.py, e.g. "
            "output/<recipe>/model_final.pth"
        )
    try:
        # Tensors and plain containers only: nothing in the file gets to run code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]  # torch's own message runs long
        raise ValueError(
            f"cannot read checkpoint {path!r} ({type(e).__name__}: {first_line}). Expected a "
            ".pth written by train_net.py."
        ) from e
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(
            f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state dict. "
            "Expected a .pth written by train_net.py."
        )
    return state


def class_metadata(config_file, opts, num_classes):
    """(class names, colours) from the recipe's ``DATASETS.TEST[0]``; (None, None) without one."""
    if not config_file:
        if opts:
            raise ValueError("--opts needs --config-file (the overrides apply to a recipe).")
        return None, None
    cfg = load_config(config_file, opts)
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError(f"{config_file} names no data set (DATASETS.TEST and TRAIN are empty).")
    metadata = MetadataCatalog.get(names[0])
    classes = metadata.get("stuff_classes", None)
    if not classes:
        raise ValueError(
            f"data set {names[0]!r} (DATASETS.TEST[0] of {config_file}) has no stuff_classes "
            "metadata: it is not registered in this process. Register it, or leave out "
            "--config-file to number the classes."
        )
    if len(classes) != num_classes:
        raise ValueError(
            f"data set {names[0]!r} of {config_file} has {len(classes)} classes, the "
            f"checkpoint's memory bank {num_classes}. Pass the recipe the checkpoint was "
            "trained with."
        )
    return list(classes), metadata.get("stuff_colors", None)


def main(argv=None):
    """Writes the two figures; returns their paths."""
    args = get_parser().parse_args(argv)
    state = load_model_state(args.checkpoint)
    bank = bank_from_state_dict(state, source=f"checkpoint {args.checkpoint!r}")
    features, classes = bank.snapshot()
    if classes.numel() == 0:
        raise ValueError(
            f"the memory bank of checkpoint {args.checkpoint!r} is empty: no training step "
            "pushed into it (a checkpoint written before the first iteration). Use a later "
            "checkpoint."
        )
    class_names, colors = class_metadata(args.config_file, args.opts, bank.num_classes)
    slots = bank.num_slots
    title = (f"{os.path.basename(args.checkpoint)}: {classes.numel():,} of {slots:,} bank slots "
             "filled")
    images = memory_summary_images(
        features, classes, bank.num_classes, class_names=class_names, stuff_colors=colors,
        method=args.method, max_per_class=args.max_per_class, seed=args.seed, title=title,
    )
    os.makedirs(args.output, exist_ok=True)
    written = []
    for name, image in images.items():
        path = os.path.join(args.output, name + ".png")
        Image.fromarray(image).save(path)
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
