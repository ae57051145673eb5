"""
Random streams that are a function of (seed, position), so that a resumed run replays them.

Detectron2 seeds Python's, NumPy's and PyTorch's global generators once, at start-up
(``default_setup``). After ``--resume`` they restart from that seed instead of continuing from
where the interrupted run was, so dropout masks, memory-bank sampling and data augmentation
differ from an uninterrupted run. Here:

- :class:`ReseedEachIteration` (a trainer hook) reseeds the three global generators before every
  iteration from ``(SEED, rank, iteration)``;
- :func:`seeded_rngs` runs a block (one sample's augmentation) with generators seeded from its
  own key, then restores the caller's state, so data loading neither depends on nor disturbs the
  training loop's streams (the loader may run in the main process).
"""
import contextlib
import random

import numpy as np
import torch

from detectron2.engine import HookBase

__all__ = [
    "derive_seed", "seed_all", "preserved_rngs", "seeded_rngs", "ReseedEachIteration"
]


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from non-negative integers (e.g. base seed, rank, iteration)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seeds Python's ``random``, NumPy's global generator and PyTorch's (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rngs():
    """Restores the global generators (Python, NumPy, PyTorch CPU) after the block."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Runs the block with the global generators seeded with ``seed``; restores them after."""
    with preserved_rngs():
        random.seed(seed)
        np.random.seed(seed)
        # The CPU generator only: seeding CUDA here would reset the training loop's GPU streams.
        torch.random.default_generator.manual_seed(seed)
        yield


class ReseedEachIteration(HookBase):
    """
    Before each iteration, seeds the global generators from ``(seed, rank, iteration)``.

    Everything random inside a step (dropout, the memory bank's slot sampling, dynamic subsets,
    pixel anchors) then depends only on the iteration, not on how many iterations this process
    has run, which makes ``--resume`` replay an uninterrupted run exactly. Ranks get different
    streams, as with ``default_setup``'s ``SEED + rank``.
    """

    def __init__(self, seed: int, rank: int = 0):
        if seed < 0:
            raise ValueError(f"ReseedEachIteration needs a seed >= 0, got {seed}")
        self._seed = int(seed)
        self._rank = int(rank)

    def before_step(self):
        seed_all(derive_seed(self._seed, self._rank, self.trainer.iter))
