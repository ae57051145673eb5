"""
Restores the few names that Detectron2 v0.6 uses and that newer libraries removed.

This is the only module that touches third-party modules' attributes. Each alias is added only
when missing, so a newer Detectron2, or old pinned numpy/Pillow/setuptools, are left untouched.
Imported by ``region_contrast/__init__.py`` before anything imports Detectron2.

- numpy 1.24 removed ``np.int``, ``np.float``, ``np.bool`` (``SemSegEvaluator``, ``Visualizer``);
  numpy 2.4 removed ``np.in1d`` (cityscapesscripts' evaluation, behind
  ``CityscapesSemSegEvaluator``).
- Pillow 10 removed ``Image.LINEAR`` (read at import of ``detectron2.data.transforms``).
- setuptools 81 removed ``pkg_resources`` (imported by ``detectron2.model_zoo``).
"""
import importlib.resources
import importlib.util
import sys
import types

import numpy as np
from PIL import Image

__all__ = ["apply"]


def _numpy_aliases():
    # The removed aliases were the Python builtins themselves.
    for name, value in (("int", int), ("float", float), ("bool", bool)):
        if name not in np.__dict__:
            setattr(np, name, value)
    if "in1d" not in np.__dict__:
        # np.in1d(a, b) was np.isin on the flattened a.
        def in1d(ar1, ar2, assume_unique=False, invert=False):
            return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert)

        np.in1d = in1d


def _pillow_aliases():
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.Resampling.BILINEAR


def _pkg_resources():
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return

    def resource_filename(package, resource):
        return str(importlib.resources.files(package).joinpath(resource))

    module = types.ModuleType("pkg_resources")
    module.__doc__ = "Minimal stand-in added by region_contrast.compat (resource_filename only)."
    module.resource_filename = resource_filename
    sys.modules["pkg_resources"] = module


def apply():
    _numpy_aliases()
    _pillow_aliases()
    _pkg_resources()


apply()
