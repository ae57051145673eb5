"""
``AtomicDetectionCheckpointer``: a ``DetectionCheckpointer`` whose files are never half-written.

fvcore's ``Checkpointer.save`` writes ``<name>.pth`` in place and then rewrites ``last_checkpoint``
in place. A run killed (or a disk filling up) during either write leaves a truncated checkpoint,
possibly the one that replaced the last good ``model_final.pth``, or an empty
``last_checkpoint``, and ``--resume`` then fails or starts over. Here each file is written to a
temporary file in the same directory, flushed to disk and renamed over the target (``os.replace``
is atomic on POSIX and Windows, :mod:`region_contrast.files`), so a reader sees either the old
file or the complete new one.
``last_checkpoint`` is only updated after the checkpoint itself is in place.
"""
import os

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..files import atomic_write

__all__ = ["AtomicDetectionCheckpointer"]


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` with atomic ``save`` and ``tag_last_checkpoint`` for local
    directories (other storage backends of ``PathManager`` use the parent's writes).
    """

    def _is_local(self):
        return "://" not in str(self.save_dir)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a directory")
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        atomic_write(save_file, lambda f: torch.save(data, f), durable=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename),
            mode="w",
            durable=True,
        )
