"""
Restores the few names that Detectron2 uses and that newer libraries, or Meta's own tree, lack.

This is the only module that touches third-party modules' attributes. Each alias is added only
when missing, so a newer Detectron2, or old pinned numpy/Pillow, are left untouched.
Imported by ``region_contrast/__init__.py`` before anything imports Detectron2.

- numpy 1.24 removed ``np.int``, ``np.float``, ``np.bool`` (v0.6's ``SemSegEvaluator``,
  ``Visualizer``); numpy 2.4 removed ``np.in1d`` (cityscapesscripts' evaluation, behind
  ``CityscapesSemSegEvaluator``).
- Pillow 10 removed ``Image.LINEAR`` (read at import of v0.6's ``detectron2.data.transforms``).
- Detectron2 main's ``CityscapesSemSegEvaluator`` imports cityscapesscripts as
  ``deeplearning.projects.cityscapesApi.cityscapesscripts``, a path that exists only inside Meta
  (upstream issue 5436): :func:`alias_cityscapes_api`, called when a Cityscapes evaluator is built.

- fvcore's and Detectron2's import-time ``torch.jit.script`` calls warn on torch 2.10+: those
  imports are made here with that one warning silenced.

One behaviour is mended rather than restored: Detectron2's ``create_ddp_model`` passes
``device_ids=[local rank]`` whatever the model's device, which DistributedDataParallel refuses
for a model on the CPU (``ValueError: DistributedDataParallel device_ids ... CPU modules``). So
``DefaultTrainer`` cannot train in CPU processes, although Detectron2 main's ``launch`` starts
them (gloo). :func:`create_ddp_model_on_any_device` calls Detectron2's own function and only adds
``device_ids=None`` (PyTorch's setting for CPU modules) where the model is on the CPU and the
caller gave none; GPU models get exactly what Detectron2 gives them.

Not restored: ``pkg_resources`` (setuptools 81 removed it; ``detectron2.model_zoo`` imports it,
nothing of this project does). A stand-in would break the real module's other users (pytest's
``monkeypatch.syspath_prepend`` among them); ``make`` installs ``setuptools<81`` instead.
"""
import functools
import importlib
import importlib.util
import inspect
import sys
import types
import warnings

import numpy as np
from PIL import Image

__all__ = [
    "apply",
    "alias_cityscapes_api",
    "create_ddp_model_on_any_device",
    "launch_runs_on_cpu",
]

# Where Detectron2 main imports cityscapesscripts from, and the modules of it that it imports.
MISSING_CITYSCAPES_ROOT = "deeplearning.projects.cityscapesApi"
CITYSCAPES_MODULES = (
    "cityscapesscripts",
    "cityscapesscripts.helpers",
    "cityscapesscripts.helpers.labels",
    "cityscapesscripts.evaluation",
    "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
    "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling",
)


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


def _detectron2_needs_cityscapes_alias():
    """Whether the installed Detectron2 imports cityscapesscripts from Meta's internal path."""
    if importlib.util.find_spec("deeplearning") is not None:  # a real tree of that name
        return False
    from detectron2.evaluation import cityscapes_evaluation

    try:
        return MISSING_CITYSCAPES_ROOT in inspect.getsource(cityscapes_evaluation)
    except (OSError, TypeError):  # no source installed: alias anyway, it only adds names
        return True


def alias_cityscapes_api():
    """
    Makes ``deeplearning.projects.cityscapesApi.cityscapesscripts[...]`` the installed
    ``cityscapesscripts`` modules (the official evaluation, the same code), only where the
    installed Detectron2 imports them from there and no such package exists. Idempotent.

    Returns:
        True when the aliases are in place (now or from an earlier call).
    """
    if f"{MISSING_CITYSCAPES_ROOT}.cityscapesscripts" in sys.modules:
        return True
    if not _detectron2_needs_cityscapes_alias():
        return False
    parts = MISSING_CITYSCAPES_ROOT.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            package = types.ModuleType(name, "Alias parent added by region_contrast.compat.")
            package.__path__ = []  # a package with nothing of its own to import
            sys.modules[name] = package
    for name in CITYSCAPES_MODULES:
        sys.modules[f"{MISSING_CITYSCAPES_ROOT}.{name}"] = importlib.import_module(name)
    return True


# Modules that call torch.jit.script at import: fvcore.nn (two loss functions) and Detectron2's
# box_regression (via detectron2.modeling).
JIT_SCRIPTING_MODULES = ("fvcore.nn", "detectron2.modeling")


def _import_jit_scripting_modules_quietly():
    # torch 2.10+ answers each import-time torch.jit.script with a FutureWarning that nobody
    # running this project can act on. Only these imports are silenced; later torch.jit.script
    # calls, the project's own warnings and everyone else's still show.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=FutureWarning)
        for name in JIT_SCRIPTING_MODULES:
            importlib.import_module(name)


def _on_cpu(model):
    return all(p.device.type == "cpu" for p in model.parameters())


def create_ddp_model_on_any_device(create_ddp_model):
    """
    Detectron2's ``create_ddp_model``, also for a model on the CPU: there it passes
    ``device_ids=None`` unless the caller named device ids. Everything else is the given
    function's (the single-process case, GPU models, fp16 compression hooks).
    """

    @functools.wraps(create_ddp_model)
    def wrapped(model, **kwargs):
        if "device_ids" not in kwargs and _on_cpu(model):
            kwargs["device_ids"] = None
        # torch 2.14 deprecates DefaultTrainer's broadcast_buffers=False, and its message says
        # to keep it (rank-local buffers): nothing a user can act on.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated",
                                    category=FutureWarning)
            return create_ddp_model(model, **kwargs)

    wrapped.detectron2_create_ddp_model = create_ddp_model
    return wrapped


def _ddp_on_cpu():
    # DefaultTrainer looks the function up in its own module (detectron2.engine.defaults); the
    # package re-exports it for user code (detectron2.engine.create_ddp_model).
    defaults = importlib.import_module("detectron2.engine.defaults")
    engine = importlib.import_module("detectron2.engine")
    current = defaults.create_ddp_model
    if hasattr(current, "detectron2_create_ddp_model"):  # already in place
        return
    wrapped = create_ddp_model_on_any_device(current)
    defaults.create_ddp_model = wrapped
    if getattr(engine, "create_ddp_model", None) is current:
        engine.create_ddp_model = wrapped


def launch_runs_on_cpu():
    """
    Whether the installed Detectron2's ``launch`` starts processes without GPUs (gloo), as
    Detectron2 main's does; v0.6's asserts that CUDA is available.
    """
    # By its module path: the package attribute of that name is the function.
    module = importlib.import_module("detectron2.engine.launch")
    try:
        return "gloo" in inspect.getsource(module).lower()
    except (OSError, TypeError):  # no source installed: assume a current Detectron2
        return True


def apply():
    _numpy_aliases()
    _pillow_aliases()
    _import_jit_scripting_modules_quietly()
    _ddp_on_cpu()


apply()
