"""
Shared machinery of the prepare scripts (``datasets/prepare_*.py``) and of the registrations.

Every prepare script follows the same contract, implemented here once:

- the data set root is ``$DETECTRON2_DATASETS`` (default ``./datasets``), as in Detectron2;
- the official downloads are checked first (:func:`check_layout`); a wrong layout is refused
  with a message that names each missing path, the download it comes from and the tree expected;
- source files are only read, never modified, moved or renamed;
- each output is written to a temporary file in its own folder (a hidden name that no loader
  lists, see :mod:`region_contrast.files`) and renamed into place (:func:`write_png_atomic`,
  :func:`~region_contrast.files.atomic_path`), so an output that exists is complete; a re-run
  skips complete outputs
  and removes the temporary files that an interrupted run left (:func:`remove_stale_temps`);
- every label value written is checked to be a valid class id or 255 (:func:`check_output_labels`);
- the work runs on all cores (:func:`parallel_map`, a ``multiprocessing.Pool``) behind a ``tqdm``
  progress bar and ends with a count (:class:`PrepareResult`).

The registration helpers (:func:`register_split`, :func:`require_folder`) give every data set the
same behaviour: registering is cheap and never fails without data, and loading a split that is
not there raises ``FileNotFoundError`` naming the data set, the path tried, ``DETECTRON2_DATASETS``
and the prepare script to run.
"""
import dataclasses
import fnmatch
import glob
import os
import sys
import time

import numpy as np
from PIL import Image

from ..files import TEMP_PREFIX, atomic_path, atomic_write, temp_path  # noqa: F401  (re-exported)

__all__ = [
    "IGNORE_LABEL",
    "TEMP_PREFIX",
    "LayoutError",
    "InvalidLabelError",
    "Required",
    "PrepareResult",
    "datasets_root",
    "describe_root",
    "check_layout",
    "temp_path",
    "atomic_path",
    "remove_stale_temps",
    "write_png_atomic",
    "read_label_image",
    "check_output_labels",
    "invalid_label_values",
    "build_lut",
    "apply_lut",
    "default_workers",
    "parallel_map",
    "run_conversion",
    "run_cli",
    "require_folder",
    "missing_data_message",
    "register_split",
    "builtin_metadata",
]

IGNORE_LABEL = 255
# Temporary outputs start with this (a hidden name: glob's "*" skips it, and with the ".tmp"
# suffix no loader that lists "*.png" / "*.jpg" picks it up).
# Below this many outputs a pool costs more than it saves.
MIN_TASKS_FOR_POOL = 64


# --------------------------------------------------------------------------------------------
# Roots and layout checks
# --------------------------------------------------------------------------------------------
def datasets_root():
    """``$DETECTRON2_DATASETS`` (``~`` expanded), default ``datasets``, as Detectron2 reads it."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def describe_root():
    """How the current root was chosen, for messages."""
    value = os.getenv("DETECTRON2_DATASETS")
    if value is None:
        default = os.path.abspath("datasets")
        return f"DETECTRON2_DATASETS is unset, so the default ./datasets ({default})"
    return f"DETECTRON2_DATASETS={value} ({os.path.abspath(os.path.expanduser(value))})"


class LayoutError(FileNotFoundError):
    """The raw downloads are not where a prepare script expects them; the message says why."""


class InvalidLabelError(ValueError):
    """A source holds a value that the data set's mapping does not allow."""


@dataclasses.dataclass(frozen=True)
class Required:
    """
    One path that a prepare script needs.

    Args:
        relpath: path relative to the data set root (``$DETECTRON2_DATASETS``).
        source: the official download it comes from (named in the error message).
        pattern: if set, ``relpath`` is a folder that must hold at least one entry matching this
            glob (relative to the folder, e.g. ``"*.png"`` or ``"*/*_gtFine_polygons.json"``);
            if None, ``relpath`` must be an existing file.
    """

    relpath: str
    source: str
    pattern: str = "*"


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _listing(folder, limit=12):
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return "    (cannot be listed)"
    if not names:
        return "    (empty)"
    shown = [
        f"    {n}/" if os.path.isdir(os.path.join(folder, n)) else f"    {n}" for n in names[:limit]
    ]
    if len(names) > limit:
        shown.append(f"    ... and {len(names) - limit} more")
    return "\n".join(shown)


def _find_nearby(start, relpath, max_depth=3, max_dirs=2000):
    """Folders under ``start`` (up to ``max_depth`` deep) where ``relpath`` does exist: a download
    extracted one level too deep or too shallow is the commonest mistake."""
    found, seen = [], 0
    frontier = [start]
    for _ in range(max_depth + 1):
        nxt = []
        for folder in frontier:
            seen += 1
            if seen > max_dirs:
                return found
            if os.path.exists(os.path.join(folder, relpath)):
                found.append(os.path.join(folder, relpath))
            try:
                with os.scandir(folder) as it:
                    nxt.extend(
                        e.path for e in it if e.is_dir(follow_symlinks=False)
                        and not e.name.startswith(".")
                    )
            except OSError:
                pass
        frontier = sorted(nxt)
    return found


def _problem(root, req):
    """None if ``req`` is satisfied under ``root``, else a short description of what is wrong."""
    path = os.path.join(root, req.relpath)
    if req.pattern is None:
        return None if os.path.isfile(path) else "missing"
    if not os.path.isdir(path):
        return "missing" if not os.path.exists(path) else "not a folder"
    if not glob.glob(os.path.join(path, req.pattern)):
        return f"holds no {req.pattern}"
    return None


def _strip_common_tail(a, b):
    """The two paths without their common trailing components (keeping the last one shared):
    /r/x/A/b/c, /r/A/b/c -> /r/x/A, /r/A."""
    pa, pb = a.split(os.sep), b.split(os.sep)
    while len(pa) > 1 and len(pb) > 1 and pa[-1] == pb[-1] and pa[-2] == pb[-2]:
        pa, pb = pa[:-1], pb[:-1]
    return os.sep.join(pa), os.sep.join(pb)


def check_layout(dataset, root, required, tree, prepare_command, hints=()):
    """
    Raises :class:`LayoutError` unless every entry of ``required`` is present under ``root``.

    The message names the data set, each missing path (absolute) with the download it comes from,
    the expected tree, what was found at the deepest existing folder, and where a missing entry
    exists elsewhere under the root (a download extracted into an extra or a missing folder).

    Args:
        dataset: human name, e.g. ``"ADE20K"``.
        root: the data set root (``$DETECTRON2_DATASETS``).
        required: list of :class:`Required`.
        tree: the expected layout under the root, as an indented text block.
        prepare_command: the command to re-run once fixed.
        hints: extra lines for the message (data-set specific diagnoses).
    """
    problems = [(req, _problem(root, req)) for req in required]
    problems = [(req, why) for req, why in problems if why]
    if not problems:
        return
    lines = [
        f"{dataset}: the official downloads are not laid out as expected under the data set "
        f"root ({describe_root()}).",
        "",
    ]
    for req, why in problems:
        path = os.path.abspath(os.path.join(root, req.relpath))
        lines.append(f"  {path}: {why} (it comes from {req.source})")
    lines += ["", "Expected tree under $DETECTRON2_DATASETS:", tree.rstrip("\n"), ""]
    first = os.path.join(root, problems[0][0].relpath)
    nearest = _nearest_existing(first)
    lines.append(f"Found in {nearest}:")
    lines.append(_listing(nearest))
    hints = list(hints)
    for req, _ in problems:
        parts = os.path.normpath(req.relpath).split(os.sep)
        # Look for the last two components (e.g. "gtFine/train") anywhere near the root.
        key = os.path.join(*parts[-2:])
        expected = os.path.abspath(os.path.join(root, req.relpath))
        hits = _find_nearby(root, key)
        parent = os.path.dirname(expected)
        if not hits and os.path.isdir(parent):
            # Extracted with its own top folder inside the expected one (parent/x/name).
            hits = _find_nearby(parent, parts[-1], max_depth=2)
        for hit in hits:
            hit = os.path.abspath(hit)
            if hit != expected:
                src, dst = _strip_common_tail(hit, expected)
                hints.append(f"  {src} exists: move it to {dst}")
    if hints:
        lines += ["", "Possibly extracted to another place:"] + sorted(set(hints))[:10]
    lines += [
        "",
        f"Fix the layout (see datasets/README.md), then run `{prepare_command}` again, with the "
        "same DETECTRON2_DATASETS.",
    ]
    raise LayoutError("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Atomic outputs
# --------------------------------------------------------------------------------------------
def write_png_atomic(path, array):
    """Writes a 2-D uint8 array (or an H x W x 3 uint8 RGB image) as a PNG, atomically."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise TypeError(f"expected a uint8 2-D or H x W x 3 array, got {array.dtype} {array.shape}")
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def png_tasks(src_dir, out_dir):
    """``(output, source)`` pairs for every PNG of ``src_dir``, same name under ``out_dir``."""
    return [
        (os.path.join(out_dir, n), os.path.join(src_dir, n))
        for n in sorted(os.listdir(src_dir))
        if n.endswith(".png") and not n.startswith(".")
    ]


def remove_stale_temps(folders):
    """Removes the temporary files (``TEMP_PREFIX*``) of interrupted runs from ``folders``."""
    removed = 0
    for folder in folders:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith(TEMP_PREFIX):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


# --------------------------------------------------------------------------------------------
# Label values
# --------------------------------------------------------------------------------------------
def read_label_image(path):
    """A single-channel label image as a 2-D uint8 array (palette indices for 'P' images)."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P"):
            raise InvalidLabelError(
                f"{path}: expected a single-channel (mode L or P) label image, got mode {img.mode}"
            )
        return np.array(img, dtype=np.uint8)


def invalid_label_values(array, num_classes, ignore_value=IGNORE_LABEL):
    """
    The values of ``array`` that are neither a class in ``[0, num_classes)`` nor
    ``ignore_value``, with their pixel counts: ``(values, counts)``, empty when all are valid.
    The one label check of the data sets (prepared outputs, the mapper's and the evaluator's
    inputs); the model checks its batches with
    :func:`region_contrast.modeling.regions.check_labels`.
    """
    array = np.asarray(array)
    bad = (array >= num_classes) & (array != ignore_value)
    if np.issubdtype(array.dtype, np.signedinteger):
        bad |= array < 0
    if not bad.any():
        return np.zeros(0, dtype=array.dtype), np.zeros(0, dtype=np.int64)
    return np.unique(array[bad], return_counts=True)


def check_output_labels(array, num_classes, where):
    """Raises :class:`InvalidLabelError` unless every value written is a class or 255."""
    values, _ = invalid_label_values(array, num_classes)
    if values.size:
        raise InvalidLabelError(
            f"{where}: output values {values.tolist()[:20]} are neither a class id in "
            f"[0, {num_classes}) nor {IGNORE_LABEL} (ignore)"
        )


def build_lut(mapping, size=256, default=-1):
    """
    A lookup table for :func:`apply_lut`: ``lut[v] = mapping[v]``; other entries get ``default``
    (-1 means "this source value is invalid").
    """
    lut = np.full(size, default, dtype=np.int32)
    for src, dst in mapping.items():
        lut[int(src)] = int(dst)
    return lut


def apply_lut(array, lut, where):
    """Maps ``array`` through ``lut`` to uint8; raises if a value is out of the table or invalid."""
    array = np.asarray(array)
    if array.size and (int(array.min()) < 0 or int(array.max()) >= len(lut)):
        raise InvalidLabelError(
            f"{where}: source values outside [0, {len(lut)}): "
            f"min {int(array.min())}, max {int(array.max())}"
        )
    out = lut[array]
    if (out < 0).any():
        bad = np.unique(array[out < 0])
        raise InvalidLabelError(f"{where}: invalid source values {bad.tolist()[:20]}")
    return out.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Parallel conversion
# --------------------------------------------------------------------------------------------
def default_workers(num_tasks):
    """All the cores this process may use; one for small jobs (a pool costs more than it saves)."""
    if num_tasks < MIN_TASKS_FOR_POOL:
        return 1
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def parallel_map(fn, tasks, *, desc, workers=None, unit="file", progress=True, done=0):
    """
    ``[fn(t) for t in tasks]`` in any order, on ``workers`` processes, with a progress bar
    (which starts at ``done``: work already complete). ``fn`` must be a module-level function
    (it is pickled to the workers).
    """
    from tqdm import tqdm

    tasks = list(tasks)
    workers = default_workers(len(tasks)) if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(tasks)))
    results = []
    with tqdm(total=done + len(tasks), initial=done, desc=desc, unit=unit,
              disable=not progress) as bar:
        if workers == 1:
            for task in tasks:
                results.append(fn(task))
                bar.update(1)
            return results
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else None
        pool = mp.get_context(method).Pool(workers)
        try:
            chunksize = max(1, min(32, len(tasks) // (workers * 8)))
            for result in pool.imap_unordered(fn, tasks, chunksize=chunksize):
                results.append(result)
                bar.update(1)
        finally:
            # Normally every result is in; on an error or Ctrl-C stop the workers at once (what
            # is written is complete, the rest is done by the next run).
            pool.terminate()
            pool.join()
    return results


@dataclasses.dataclass
class PrepareResult:
    """What one prepare step did."""

    name: str
    written: int = 0
    skipped: int = 0
    stale_removed: int = 0
    seconds: float = 0.0

    @property
    def total(self):
        return self.written + self.skipped

    def summary(self):
        text = (
            f"{self.name}: {self.written} written, {self.skipped} already complete, "
            f"{self.total} in total ({self.seconds:.1f} s)"
        )
        if self.stale_removed:
            text += f"; removed {self.stale_removed} temporary files of an interrupted run"
        return text


def run_conversion(name, tasks, worker, *, workers=None, progress=True, unit="file"):
    """
    Runs ``worker(task)`` for every task whose output does not exist yet.

    Each task is a tuple whose first element is its output path; ``worker`` must write that path
    atomically. Output folders are created and stale temporary files in them removed first.

    Returns:
        :class:`PrepareResult`.
    """
    start = time.perf_counter()
    tasks = list(tasks)
    folders = sorted({os.path.dirname(t[0]) for t in tasks})
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    stale = remove_stale_temps(folders)
    pending = [t for t in tasks if not os.path.exists(t[0])]
    parallel_map(worker, pending, desc=name, workers=workers, unit=unit, progress=progress,
                 done=len(tasks) - len(pending))
    return PrepareResult(
        name=name,
        written=len(pending),
        skipped=len(tasks) - len(pending),
        stale_removed=stale,
        seconds=time.perf_counter() - start,
    )


def run_cli(prepare, description, argv=None):
    """
    The whole command line of a prepare script: ``--workers`` and ``--no-progress``, the root
    from ``DETECTRON2_DATASETS``, the results printed, and a wrong layout or an invalid source
    turned into ``error: ...`` on stderr with exit status 2.

    Args:
        prepare: ``prepare(root, workers=..., progress=...) -> list[PrepareResult]``.
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--workers", type=int, default=None,
        help="processes to use (default: all cores; one for fewer than "
        f"{MIN_TASKS_FOR_POOL} files)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    root = datasets_root()
    start = time.perf_counter()
    try:
        results = prepare(root, workers=args.workers, progress=not args.no_progress)
    except (LayoutError, InvalidLabelError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    for result in results:
        print(result.summary())
    written = sum(r.written for r in results)
    total = sum(r.total for r in results)
    print(
        f"Done: {written} files written, {total - written} already complete, {total} in total, "
        f"under {os.path.abspath(root)} ({time.perf_counter() - start:.1f} s)."
    )
    return results


# --------------------------------------------------------------------------------------------
# Registration helpers
# --------------------------------------------------------------------------------------------
def missing_data_message(name, path, what, prepare_command, downloads):
    return (
        f"Data set '{name}' not found: {what} {os.path.abspath(path)} is missing or empty. "
        f"Data sets are read under $DETECTRON2_DATASETS ({describe_root()}). "
        f"Download {downloads}, extract them as datasets/README.md shows, then run "
        f"`{prepare_command}` from the repository root with the same DETECTRON2_DATASETS "
        "(or point DETECTRON2_DATASETS at the root that holds them)."
    )


def require_folder(name, path, pattern, what, prepare_command, downloads):
    """Raises ``FileNotFoundError`` (see :func:`missing_data_message`) unless ``path`` is a folder
    holding at least one entry matching ``pattern``."""
    ok = False
    if os.path.isdir(path):
        with os.scandir(path) as it:
            ok = any(fnmatch.fnmatch(e.name, pattern) for e in it)
    if not ok:
        raise FileNotFoundError(
            missing_data_message(name, path, what, prepare_command, downloads)
        )


def register_split(name, load, metadata=None):
    """
    Registers (or re-registers) ``name`` in ``DatasetCatalog`` with the loader ``load``.

    Cheap: nothing is read until ``DatasetCatalog.get(name)``. With ``metadata``, the metadata is
    replaced by it; without, existing metadata (e.g. Detectron2's builtin) is kept as it is.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
    if metadata is not None:
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        MetadataCatalog.get(name).set(**metadata)


def register_sem_seg(name, load, images, labels, *, builtin=False, evaluator_type="sem_seg",
                     **extra):
    """
    Registers one split of a semantic segmentation data set: ``load(name, images, labels)``
    (the two folders) gives its records, and its metadata is what Detectron2's evaluators read
    (``image_root``, ``sem_seg_root``, ``evaluator_type``, ``ignore_label``) plus ``extra``
    (classes, colours). ``builtin``: Detectron2 registers ``name`` itself; its metadata is kept,
    only the loader (same records, clearer errors) is replaced. Returns ``name``.
    """
    metadata = None if builtin else dict(
        image_root=images, sem_seg_root=labels, evaluator_type=evaluator_type,
        ignore_label=IGNORE_LABEL, **extra,
    )
    register_split(name, lambda: load(name, images, labels), metadata)
    return name


def builtin_metadata(name, keys):
    """
    The fields ``keys`` (those it has) of the metadata Detectron2 registers for its own data
    set ``name``: what a copy of that data set under another name or root should carry.
    """
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    return {k: getattr(meta, k) for k in keys if hasattr(meta, k)}
