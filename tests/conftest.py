"""
Helpers shared by the test modules (``from conftest import ...``): the tiny RegionContrast model
and its batches, a training step, tiny DigitScenes, comparisons.
"""
import contextlib
import os
import socket

import pytest
import torch

import region_contrast  # noqa: F401
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from region_contrast.compat import launch_runs_on_cpu
from region_contrast.data import digit_scenes as ds
from region_contrast.engine import get_region_contrast_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO, "configs", "Base-DigitScenes.yaml")
NUM_CLASSES = 5
SIZE = 64


def make_cfg(num_classes=NUM_CLASSES, norm=None, crop=SIZE, enabled=True, **rc):
    """A tiny DeepLabV3+ (ResNet-18) RegionContrast model; ``norm`` overrides both norms."""
    cfg = get_region_contrast_cfg()
    cfg.merge_from_file(BASE_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 32
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"
    if norm is not None:
        cfg.MODEL.RESNETS.NORM = norm
        cfg.MODEL.SEM_SEG_HEAD.NORM = norm
    cfg.INPUT.CROP.SIZE = (crop, crop)
    return with_contrast(cfg, enabled, proj_dim=16, **rc)


def with_contrast(cfg, enabled, *, proj_dim, **rc):
    """``cfg`` with a tiny bank (6 slots per class), ``proj_dim`` and the ``rc`` overrides."""
    cfg.MODEL.REGION_CONTRAST.ENABLED = enabled
    cfg.MODEL.REGION_CONTRAST.PROJ_DIM = proj_dim
    cfg.MODEL.REGION_CONTRAST.MEMORY_SIZE = 6
    for key, value in rc.items():
        cfg.MODEL.REGION_CONTRAST[key] = value
    return cfg


def make_fpn_cfg(num_classes=NUM_CLASSES, enabled=True, **rc):
    """
    A tiny Semantic FPN (ResNet-18 + FPN, Detectron2's ``SemanticSegmentor`` and
    ``SemSegFPNHead``) with region contrast added through ``RegionContrastHead``.
    """
    cfg = get_region_contrast_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.SEM_SEG_HEAD.NAME = "RegionContrastHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.REGION_CONTRAST.HEAD_NAME = "SemSegFPNHead"
    return with_contrast(cfg, enabled, proj_dim=0, **rc)


# Whether train_net.py can start several processes here: Detectron2 main's launch() runs CPU
# processes (gloo); v0.6's asserts CUDA.
SEVERAL_PROCESSES = launch_runs_on_cpu() or torch.cuda.is_available()
NO_SEVERAL_PROCESSES = ("this Detectron2's launch() starts GPU processes only (v0.6 asserts "
                        "CUDA); official Detectron2 main runs CPU processes with gloo")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def make_batch(seed=0, n=2, size=SIZE, num_classes=NUM_CLASSES, classes=None, all_ignore=False):
    """Blocky random labels (8x8 cells) drawn from ``classes`` (default: all), 5% ignore."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(num_classes) if classes is None else torch.as_tensor(classes)
    batch = []
    for _ in range(n):
        cells = pool[torch.randint(0, len(pool), (size // 8, size // 8), generator=g)]
        label = cells.repeat_interleave(8, 0).repeat_interleave(8, 1)
        label[torch.rand(size, size, generator=g) < 0.05] = 255
        if all_ignore:
            label[:] = 255
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        batch.append({"image": image, "sem_seg": label, "height": size, "width": size})
    return batch


def train_step(model, batch, it=0):
    model.train()
    with EventStorage(it) as storage:
        losses = model(batch)
        sum(losses.values()).backward()
    return losses, storage


def tiny_digit_scenes(root, prefix, *, num_train=8, num_val=2, num_test=2, size=64, seed=1):
    """Generates and registers ``<prefix>_{train,val,test}``; returns the names."""
    ds.generate_digit_scenes(
        root, num_train=num_train, num_val=num_val, num_test=num_test, size=size, seed=seed,
        progress=False,
    )
    return ds.register_digit_scenes(root, name_prefix=prefix)


# The tiny DigitScenes most modules train and evaluate on, generated once per test session.
TINY = "tiny_digit_scenes"


@pytest.fixture(scope="session")
def tiny_scenes(tmp_path_factory):
    """``tiny_digit_scenes_{train,val,test}``: 16 / 4 / 2 scenes of 128x128."""
    root = str(tmp_path_factory.mktemp("tiny_digit_scenes"))
    names = tiny_digit_scenes(root, TINY, num_train=16, num_val=4, size=128)
    yield names
    unregister(names)


def digit_scenes_root(names):
    """The $DETECTRON2_DATASETS that holds the DigitScenes of ``names`` (its digit_scenes/)."""
    val = DatasetCatalog.get(names[1])[0]["file_name"]
    return val[: val.index(os.sep + "digit_scenes" + os.sep)]


def unregister(names):
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def parse_args(*argv):
    return default_argument_parser().parse_args(["--config-file", BASE_CONFIG, *argv])


def tree_equal(a, b, path="checkpoint"):
    """Bitwise equality of nested dicts/lists of tensors and plain values; names the first diff."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture
def one_thread():
    """The test runs on one intra-op thread (see :func:`single_thread`)."""
    with single_thread():
        yield


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: on a small, shared CPU, two threads contend and run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
