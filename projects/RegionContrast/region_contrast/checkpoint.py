"""
``AtomicDetectionCheckpointer``: a ``DetectionCheckpointer`` whose files are never half-written.

fvcore's ``Checkpointer.save`` writes ``<name>.pth`` in place and then rewrites ``last_checkpoint``
in place. A run killed (or a disk filling up) during either write leaves a truncated checkpoint,
possibly the one that replaced the last good ``model_final.pth``, or an empty
``last_checkpoint``, and ``--resume`` then fails or starts over. Here each file is written to a
temporary file in the same directory, flushed to disk and renamed over the target (``os.replace``
is atomic on POSIX and Windows), so a reader sees either the old file or the complete new one.
``last_checkpoint`` is only updated after the checkpoint itself is in place.
"""
import os
import uuid

import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicDetectionCheckpointer", "atomic_write"]


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, mode="wb"):
    """
    Calls ``write(f)`` on a temporary file next to ``path`` and renames it to ``path``.

    On any error (or interrupt) the temporary file is removed and ``path`` is untouched. A
    process killed outright leaves only a hidden ``.<name>.<random>.tmp`` file behind.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 gives the permissions (under the umask) that open() would give.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


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
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename),
            mode="w",
        )
