"""
Atomic file writes, for everything the project writes (checkpoints, prepared data sets, results):
the content goes to a hidden temporary file in the same folder, which is renamed over the target
only once complete (``os.replace`` is atomic within a file system), so a reader sees the old file
or the new one, never a part; after an error nothing of the attempt is left.

Temporary names start with :data:`TEMP_PREFIX` (hidden, and ending in ``.tmp`` unless the writer
needs the extension), so no loader lists them and a re-run can remove those of a killed process.
"""
import contextlib
import os
import uuid

__all__ = ["TEMP_PREFIX", "temp_path", "atomic_path", "atomic_write"]

TEMP_PREFIX = ".rc_tmp."


def temp_path(path, keep_ext=False):
    """
    A temporary path in ``path``'s folder, unique to this call, hidden (leading dot) and, unless
    ``keep_ext``, ending in ``.tmp``. ``keep_ext`` keeps the extension, for writers that infer
    the format from the name; use it only in folders that loaders scan with a glob (which skips
    hidden names) or not at all.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = f"{TEMP_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:8]}.{name}"
    return os.path.join(folder, tmp if keep_ext else tmp + ".tmp")


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, *, keep_ext=False, durable=False):
    """
    Yields a temporary path for the block to write; when the block completes, the file there
    replaces ``path``; on any error (or interrupt) it is removed and ``path`` is untouched.
    ``durable`` also flushes the file and the rename to disk (for checkpoints).
    """
    tmp = temp_path(path, keep_ext)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if durable:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write(path, write, mode="wb", *, durable=False):
    """Calls ``write(f)`` on a file opened in ``mode`` and puts it at ``path`` atomically."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, mode) as f:
            write(f)
