"""
Cost benchmark: what RegionContrast adds to a training step, and proof that it adds nothing to
inference (``python tools/benchmark.py``, ``make bench``).

Every comparison runs in one process, RegionContrast (RC) and its baseline interleaved
(A B B A A B ...: pairs alternate their order) after warm-up, and is reported as
min / median / max with the median of the per-pair ratios RC / baseline (robust to a load that
drifts during the run) and the ratio of the medians.

Parts (one module each):
  1. ``train_step``: train step (forward + backward + optimizer step), RC vs ``ENABLED: False``
     built from the same recipe, the same weights and the same batches, with a pre-filled bank
     and an iteration past warm-up; time, the extra time per phase, and peak memory. Recipes:
     DigitScenes and a Cityscapes DeepLabV3+ R101 recipe (reduced crop on the CPU; full crop,
     batch per GPU, AMP on CUDA). The DigitScenes ratio is pooled over 6 blocks of fresh
     models, with a resampled 95% interval.
  2. ``train_step``: inference: eval-mode forward time ratio, identical outputs, the same
     operators, the bank untouched.
  3. ``contrast``: the criterion alone (region centres + projection + loss + bank update,
     forward + backward) at 19 / 150 / 171 classes against naive per-class loops.
  4. ``recipes``: bank bytes of every recipe in configs/ next to a pixel memory.
  5. (``--device cuda``) images/s and peak CUDA memory at Cityscapes, ADE20K, COCO-Stuff scale.

``stats`` holds the timing and statistics, ``machine`` what the run ran on, ``report`` the
table, ``cli`` the command line and the targets.
"""
