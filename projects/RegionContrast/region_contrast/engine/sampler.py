"""
A training loader that resumes exactly where an interrupted run stopped.

Detectron2 v0.6's ``TrainingSampler`` restarts its seeded stream at ``--resume``, so the resumed
run sees the first batches again, and the augmentations draw from the process-global NumPy
generator, whose state is not in the checkpoint either. Here:

- :class:`ResumableTrainingSampler` produces the same infinite stream as ``TrainingSampler``
  (``shuffle(range(n)) + shuffle(range(n)) + ...`` from a seeded generator, rank ``r`` of ``W``
  taking positions ``r, r + W, ...``), but can start at any position: at iteration ``k`` it skips
  the ``k * IMS_PER_BATCH`` items that all ranks consumed together. It yields
  ``(position, index)`` pairs;
- :class:`SeededMapDataset` maps ``dataset[index]`` with the global generators seeded from
  ``(seed, position)``, so a sample's augmentation depends only on its place in the stream (and
  not on the data-loader worker that happens to load it);
- :class:`ResumableTrainLoader` starts its iterator lazily, so the trainer can set the start
  iteration after loading the checkpoint (``Trainer.resume_or_load``) and before any worker
  begins reading;
- :func:`build_resumable_train_loader` gives the sampler to a map-style PyTorch ``DataLoader``,
  so the main process draws the positions and the batches come in stream order whatever
  ``DATALOADER.NUM_WORKERS`` is. (Detectron2's ``build_detection_train_loader`` would do it on
  v0.6, but Detectron2 main runs the sampler in each worker and splits the stream into
  batch-size chunks per worker: with aspect-ratio grouping the order then depends on the
  number of workers and on where the stream starts, and a resumed run differs.)

With ``DATALOADER.ASPECT_RATIO_GROUPING`` the resumed batches are exact when all training samples
fall in one aspect-ratio group, as they do with ``INPUT.CROP`` (every sample is then padded to the
crop size by :class:`~region_contrast.data.mapper.ValidatingDatasetMapper`). With groups of
different orientations, samples buffered in the other group at the checkpoint are skipped.
With ``SEED < 0`` the stream seed is drawn at random at each start, so a resumed run continues
with fresh randomness (as in Detectron2).
"""
import itertools
import logging
import operator
import random

import torch
import torch.utils.data as torchdata

from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.utils import comm

from .rng import derive_seed, preserved_rngs, seeded_rngs

__all__ = [
    "ResumableTrainingSampler",
    "SeededMapDataset",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
]

logger = logging.getLogger(__name__)


class ResumableTrainingSampler(torchdata.Sampler):
    """
    The infinite, seeded stream of ``TrainingSampler``, startable at any position.

    Yields ``(position, index)``: ``position`` counts the stream items of all ranks together,
    ``index`` is the data set index (the sequence of indices equals ``TrainingSampler``'s for the
    same seed, rank and world size).
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool = True, start: int = 0,
                 rank=None, world_size=None):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"ResumableTrainingSampler needs a data set size > 0, got {size!r}")
        self._size = size
        self._seed = int(seed)
        self._shuffle = shuffle
        self._rank = comm.get_rank() if rank is None else int(rank)
        self._world_size = comm.get_world_size() if world_size is None else int(world_size)
        self.set_start(start)

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def start(self) -> int:
        return self._start

    def set_start(self, start: int) -> None:
        """Starts the stream at ``start`` items consumed by all ranks together."""
        if start < 0 or start % self._world_size:
            raise ValueError(
                f"start must be a non-negative multiple of the world size {self._world_size}, "
                f"got {start}"
            )
        self._start = int(start)

    def _epoch(self, g):
        if self._shuffle:
            return torch.randperm(self._size, generator=g).tolist()
        return list(range(self._size))

    def _stream(self, start):
        """(position, index) from ``start`` on; skipped epochs only advance the generator."""
        g = torch.Generator()
        g.manual_seed(self._seed)
        epoch, offset = divmod(start, self._size)
        for _ in range(epoch):
            self._epoch(g)
        position = epoch * self._size
        while True:
            for index in self._epoch(g)[offset:]:
                yield position + offset, index
                offset += 1
            position += self._size
            offset = 0

    def __iter__(self):
        yield from itertools.islice(self._stream(self._start), self._rank, None, self._world_size)


class SeededMapDataset(torchdata.Dataset):
    """
    ``dataset[index]`` mapped by ``mapper`` with the global generators seeded from
    ``(seed, position)``; the item is the pair that :class:`ResumableTrainingSampler` yields.

    A mapper returning None (skip this sample) is retried on other indices drawn from the same
    seeded stream, as ``MapDataset`` does, so the replacement is reproducible too.
    """

    def __init__(self, dataset, mapper, seed: int):
        self._dataset = dataset
        self._mapper = mapper
        self._seed = int(seed)

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, item):
        position, index = item
        seed = derive_seed(self._seed, position)
        retry = random.Random(seed)
        for attempt in itertools.count():
            with seeded_rngs(derive_seed(seed, attempt)):
                data = self._mapper(self._dataset[index])
            if data is not None:
                return data
            if attempt == 3:
                logger.warning(f"Failed to map sample {index} after {attempt + 1} attempts.")
            index = retry.randrange(len(self._dataset))


class _LazyIterator:
    def __init__(self, loader):
        self._loader = loader
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        # Nothing the loader does may move the training loop's random streams: PyTorch's
        # DataLoader draws its workers' base seed from the global generator when its iterator
        # starts (at the first batch with aspect-ratio grouping), and with NUM_WORKERS 0 the
        # mapping runs here (it is seeded per sample anyway).
        with preserved_rngs():
            if self._iterator is None:
                self._loader._started = True
                self._iterator = iter(self._loader.loader)
            return next(self._iterator)


class ResumableTrainLoader:
    """
    Iterable of training batches; its iterators start reading at the first ``next``, from the
    iteration last given to :meth:`set_start_iter`.
    """

    def __init__(self, loader, sampler: ResumableTrainingSampler, total_batch_size: int):
        self.loader = loader
        self.sampler = sampler
        self.total_batch_size = int(total_batch_size)
        self._started = False

    def set_start_iter(self, start_iter: int) -> None:
        """Makes the next batch the one that iteration ``start_iter`` of a fresh run would get."""
        if self._started:
            raise RuntimeError(
                "set_start_iter() must be called before the first batch is read "
                "(Trainer.resume_or_load does it before training)."
            )
        self.sampler.set_start(start_iter * self.total_batch_size)

    def __iter__(self):
        return _LazyIterator(self)


def _batches(dataset, sampler, batch_size, *, aspect_ratio_grouping, num_workers):
    """
    Batches of ``batch_size`` items of ``dataset`` at the sampler's indices, in the sampler's
    order: a map-style ``DataLoader`` draws the indices in the main process and returns the
    workers' results in that order. Aspect-ratio grouping is Detectron2's.
    """
    if aspect_ratio_grouping:
        items = torchdata.DataLoader(
            dataset, sampler=sampler, batch_size=1, num_workers=num_workers,
            collate_fn=operator.itemgetter(0), worker_init_fn=worker_init_reset_seed,
        )
        return AspectRatioGroupedDataset(items, batch_size)
    return torchdata.DataLoader(
        dataset, batch_sampler=torchdata.BatchSampler(sampler, batch_size, drop_last=True),
        num_workers=num_workers, collate_fn=trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
    )


def build_resumable_train_loader(cfg, mapper):
    """
    The training loader of ``cfg`` (``DATASETS.TRAIN``, ``SOLVER.IMS_PER_BATCH``,
    ``DATALOADER.*``) with :class:`ResumableTrainingSampler` and per-sample seeding: the same
    batches for any number of data-loader workers, on Detectron2 v0.6 and main alike.
    """
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN = {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported by the "
            "resumable training loader of this project: expected 'TrainingSampler' (the others "
            "need instance annotations, which semantic segmentation data sets do not have)."
        )
    total_batch_size, world_size = cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH = {total_batch_size} must be a positive multiple of the "
            f"number of processes ({world_size}): each takes IMS_PER_BATCH / processes images. "
            "Fix it in the recipe or on the command line."
        )
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    # SEED >= 0: the stream is a function of SEED alone, so resume can replay it.
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    sampler = ResumableTrainingSampler(len(dicts), seed=seed)
    dataset = SeededMapDataset(DatasetFromList(dicts, copy=False), mapper, seed)
    loader = _batches(
        dataset, sampler, total_batch_size // world_size,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    return ResumableTrainLoader(loader, sampler, total_batch_size)
