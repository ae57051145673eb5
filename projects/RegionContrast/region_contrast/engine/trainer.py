"""The trainer and config setup behind ``train_net.py``, importable so tests run the same code."""
import importlib.util
import logging
import os
from collections import OrderedDict

import torch
import torch.distributed as dist

import detectron2.data.transforms as T
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators
from detectron2.projects.deeplab import add_deeplab_config, build_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import AtomicDetectionCheckpointer
from ..compat import launch_runs_on_cpu
from ..config import add_region_contrast_config
from ..data.mapper import ValidatingDatasetMapper
from ..modeling.head_contrast import find_region_contrast
from .sampler import ResumableTrainLoader, build_resumable_train_loader
from ..evaluation import OfficialCityscapesSemSegEvaluator, ValidatingSemSegEvaluator
from .hooks import build_bank_agreement_check, build_memory_summary_hook
from .rng import ReseedEachIteration
from .solver import build_optimizer
from ..evaluation.test_time_augmentation import SemanticSegmentorWithTTA

logger = logging.getLogger(__name__)

# The results key of SemSegEvaluator's metrics on Cityscapes, where "sem_seg" is the official
# evaluation's (as in Detectron2).
SEM_SEG_BESIDE_CITYSCAPES = "sem_seg_detectron2"
# The evaluator types whose evaluators read only a "sem_seg" output (test-time augmentation gives
# only that).
SEMANTIC_EVALUATOR_TYPES = ("sem_seg", "cityscapes_sem_seg")
PANOPTICAPI_INSTALL = "pip install git+https://github.com/cocodataset/panopticapi.git"


def panoptic_quality_available():
    """Whether ``panopticapi`` (behind Detectron2's ``COCOPanopticEvaluator``) is installed."""
    return importlib.util.find_spec("panopticapi") is not None


def build_sem_seg_train_aug(cfg):
    """Resize, category-area-constrained crop and flip, as Detectron2's DeepLab recipes do."""
    augs = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    return augs


class Trainer(DefaultTrainer):
    """
    ``DefaultTrainer`` with the semantic-segmentation loader, evaluators and solver, made
    reliable: inputs are validated (``ValidatingDatasetMapper``, ``ValidatingSemSegEvaluator``),
    checkpoints are written atomically and hold the optimizer state, and with ``SEED >= 0`` a
    resumed run replays the uninterrupted one exactly (resumable data stream, per-iteration
    reseeding).
    """

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        loader = self.data_loader
        if isinstance(loader, ResumableTrainLoader):
            # Continue the data stream where the checkpointed run was, not from its start.
            loader.set_start_iter(self.start_iter)

    def state_dict(self):
        # Detectron2 v0.6's DefaultTrainer checkpoints the iteration and the hooks (scheduler)
        # but not its SimpleTrainer/AMPTrainer: the optimizer state (momentum, Adam moments) and
        # the AMP grad scaler were lost at --resume. Later Detectron2 versions add them under
        # the same key.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning(
                "The checkpoint has no optimizer state (it was written by Detectron2 v0.6's "
                "DefaultTrainer); the optimizer starts afresh from its hyper-parameters."
            )

    def build_hooks(self):
        # DefaultTrainer builds its checkpointer before its hooks, and the checkpointing hook
        # takes it when built: make it the atomic one first (same model, folder and trainer).
        self.checkpointer = AtomicDetectionCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, **self.checkpointer.checkpointables
        )
        ret = super().build_hooks()
        if self.cfg.SEED >= 0:
            ret.insert(0, ReseedEachIteration(self.cfg.SEED, comm.get_rank()))
        if self.cfg.TEST.AUG.ENABLED:
            # Test-time augmentation once training ends, right after the plain evaluation (and
            # before the writers, which then log it); train_net returns both results.
            def test_with_tta_and_save():
                results = self.test_with_TTA(self.cfg, self.model)
                merged = OrderedDict(getattr(self, "_last_eval_results", None) or {})
                merged.update(results)
                self._last_eval_results = merged
                return results

            at = max((i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), default=-1)
            ret.insert(at + 1 if at >= 0 else len(ret), hooks.EvalHook(0, test_with_tta_and_save))
        summary = build_memory_summary_hook(self.cfg, self.model)
        if summary is not None:
            # Before the writers, so that TensorBoard gets the bank's pictures the same step.
            at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)), None)
            ret.insert(len(ret) if at is None else at, summary)
        agreement = build_bank_agreement_check(self.model)
        if agreement is not None:
            ret.append(agreement)
        return ret

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """
        Detectron2's evaluation, of the model the checkpoint holds: in a multi-process run every
        rank first takes rank 0's buffers. Detectron2 trains with ``broadcast_buffers=False``,
        so BatchNorm's running statistics drift apart per rank, and each rank would otherwise
        evaluate its share of the images with statistics that no checkpoint has (rank 0 writes
        the checkpoints). Training is unaffected: in training mode BatchNorm normalises with
        the batch's own statistics.
        """
        if comm.get_world_size() > 1:
            synchronize_buffers(model)
        return super().test(cfg, model, evaluators)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """
        Evaluates ``model`` with multi-scale and flip test-time augmentation (``TEST.AUG``, see
        :class:`SemanticSegmentorWithTTA`) on ``DATASETS.TEST``; results come under the
        evaluators' keys with ``_TTA`` appended, outputs in ``OUTPUT_DIR/inference_TTA/``.
        """
        logger.info("Running inference with test-time augmentation ...")
        model = SemanticSegmentorWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name)
            )
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, model, evaluators)
        return OrderedDict((key + "_TTA", value) for key, value in results.items())

    @classmethod
    def build_model(cls, cfg):
        """The parent's model; with ``MODEL.REGION_CONTRAST.ENABLED``, fails unless it has it."""
        model = super().build_model(cfg)
        if cfg.MODEL.REGION_CONTRAST.ENABLED and find_region_contrast(model) is None:
            name = cfg.MODEL.SEM_SEG_HEAD.NAME
            raise ValueError(
                f"MODEL.REGION_CONTRAST.ENABLED is True, but MODEL.META_ARCHITECTURE = "
                f"{cfg.MODEL.META_ARCHITECTURE!r} with MODEL.SEM_SEG_HEAD.NAME = {name!r} has no "
                "region contrast. Set MODEL.SEM_SEG_HEAD.NAME: 'RegionContrastHead' and "
                f"MODEL.REGION_CONTRAST.HEAD_NAME: {name!r} (docs/add_to_your_model.md)."
            )
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        if evaluator_type == "sem_seg":
            return ValidatingSemSegEvaluator(
                dataset_name, distributed=True, output_dir=output_folder
            )
        if evaluator_type == "cityscapes_sem_seg":
            # The official Cityscapes numbers under Detectron2's key, "sem_seg", and Detectron2's
            # confusion-matrix metrics (per-class IoU, accuracy) beside them.
            return DatasetEvaluators(
                [
                    OfficialCityscapesSemSegEvaluator(dataset_name),
                    ValidatingSemSegEvaluator(
                        dataset_name, distributed=True, output_dir=output_folder,
                        result_key=SEM_SEG_BESIDE_CITYSCAPES,
                    ),
                ]
            )
        if evaluator_type == "coco_panoptic_seg":
            # As Detectron2's tools/train_net.py: the stuff mIoU of the semantic branch, COCO box
            # and mask AP, and PQ/SQ/RQ when panopticapi is installed (see check_evaluation).
            # AP from the official COCO API (pycocotools), not Detectron2's faster C++ copy of
            # it: the numbers a paper cites, and the copy is missing from builds without
            # Detectron2's C++ sources (tools/install_detectron2.py's v0.6 fallback).
            evaluators = [
                ValidatingSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder),
                COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False),
            ]
            if panoptic_quality_available():
                evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
            return DatasetEvaluators(evaluators)
        raise NotImplementedError(
            f"No evaluator for data set {dataset_name!r} with evaluator_type {evaluator_type!r}; "
            "expected 'sem_seg', 'cityscapes_sem_seg' or 'coco_panoptic_seg'."
        )

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = ValidatingDatasetMapper(
            cfg, is_train=True, augmentations=build_sem_seg_train_aug(cfg)
        )
        return build_resumable_train_loader(cfg, mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)


def synchronize_buffers(model):
    """A collective: every rank's buffers of ``model`` (DDP-wrapped or not) become rank 0's."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def get_region_contrast_cfg():
    """A default config with Detectron2's, the DeepLab project's and this project's keys."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_region_contrast_config(cfg)
    return cfg


def fall_back_to_cpu(cfg):
    """
    Sets ``MODEL.DEVICE`` of an unfrozen ``cfg`` to "cpu" when it names CUDA and no GPU is
    present (recipes name CUDA; a machine without a GPU still runs them unchanged).

    Returns:
        True when the device was changed.
    """
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        return True
    return False


def load_config(config_file, opts=()):
    """
    The one way this project reads a recipe: the default config with every key
    (:func:`get_region_contrast_cfg`), the file, then the overrides (KEY VALUE ...), on the CPU
    when the recipe names CUDA and no GPU is present. Returns it frozen.
    """
    cfg = get_region_contrast_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    fall_back_to_cpu(cfg)
    cfg.freeze()
    return cfg


def setup(args):
    """:func:`load_config` of ``--config-file`` and the overrides, then Detectron2's
    ``default_setup`` (output folder, logging, seed)."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    # default_setup shows Detectron2's and fvcore's logs; the project's own (the memory bank's
    # size, this message) need their logger too, as Detectron2's projects set up theirs.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="region_contrast")
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("No CUDA device available: running on the CPU.")
    check_evaluation(cfg)
    return cfg


def check_evaluation(cfg):
    """
    Before any training: raises ValueError for test-time augmentation on a data set whose
    evaluators need more than the semantic output, and warns when panoptic quality cannot be
    computed (panopticapi missing: the other metrics still are), or raises FileNotFoundError
    when the panoptic ground truth it reads is not where the data set's metadata says.
    """
    for name in cfg.DATASETS.TEST:
        metadata = MetadataCatalog.get(name)
        evaluator_type = metadata.get("evaluator_type", None)
        if cfg.TEST.AUG.ENABLED and evaluator_type not in SEMANTIC_EVALUATOR_TYPES:
            raise ValueError(
                f"TEST.AUG.ENABLED is True, but DATASETS.TEST has {name!r} (evaluator_type "
                f"{evaluator_type!r}): test-time augmentation here averages semantic "
                "segmentation only, and this data set's evaluators also need instances or "
                "panoptic segments. Set TEST.AUG.ENABLED False for it."
            )
        if evaluator_type != "coco_panoptic_seg":
            continue
        if not panoptic_quality_available():
            logger.warning(
                f"{name}: panopticapi is not installed, so PQ/SQ/RQ will not be computed (the "
                f"stuff mIoU and COCO box/mask AP will). To get them: {PANOPTICAPI_INSTALL}"
            )
            continue
        # Training never reads the panoptic PNGs and JSON; only PQ does, at the very end.
        for key, exists in (("panoptic_root", os.path.isdir), ("panoptic_json", os.path.isfile)):
            path = metadata.get(key, None)
            if path is not None and not exists(path):
                raise FileNotFoundError(
                    f"{name}: {key} {os.path.abspath(path)} does not exist, and panoptic "
                    "quality is computed from it after training. Unzip COCO's panoptic "
                    "annotations there (datasets/README.md, COCO panoptic), or check "
                    "DETECTRON2_DATASETS."
                )


def check_launch(args):
    """
    Raises SystemExit with what to do when ``args`` ask for several processes that the installed
    Detectron2 cannot start: without a GPU, v0.6's ``launch`` stops on an assertion.
    """
    processes = args.num_gpus * args.num_machines
    if processes > 1 and not torch.cuda.is_available() and not launch_runs_on_cpu():
        raise SystemExit(
            f"--num-gpus {args.num_gpus} --num-machines {args.num_machines}: {processes} "
            "processes without a GPU, but this Detectron2's launch() starts GPU (NCCL) processes "
            "only (Detectron2 v0.6). Run with --num-gpus 1 --num-machines 1, or install official "
            "Detectron2 main, whose launch() runs CPU processes with gloo (docs/install.md)."
        )


def main(args):
    """
    What ``train_net.py`` runs in every process: trains, resumes (``--resume``) or only
    evaluates (``--eval-only``, with ``TEST.AUG.ENABLED`` also multi-scale + flip). Returns the
    evaluation results (those of the end of training).
    """
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
