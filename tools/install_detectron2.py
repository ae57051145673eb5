#!/usr/bin/env python
"""
Make Detectron2 importable in the running interpreter's environment.

1. An importable Detectron2 (an official build, say) is kept as it is.
2. Otherwise a wheel built earlier for the same Python and torch is taken from the cache.
3. Otherwise the ``pb1-detectron2==0.6`` sdist (official Detectron2 v0.6 Python sources, shipped
   without ``detectron2/layers/csrc``) is downloaded, checked against its known sha256, given a
   placeholder ``_C`` extension so that ``setup.py`` can build, turned into a wheel that goes to
   the cache, and installed with ``--no-deps`` (pyproject.toml lists the runtime requirements).
   ``--sdist PATH`` takes that sdist from a local file instead (machines without network); it
   must have the same sha256.

The placeholder ``_C`` has no operators: deformable convolution, rotated boxes/ROIAlignRotated
and the C++ COCO evaluation fail if called. Semantic segmentation never calls them.

Usage: ``python tools/install_detectron2.py [--cache-dir DIR] [--force] [--sdist PATH]``
"""
import argparse
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

SDIST = "pb1-detectron2==0.6"
SDIST_FILE = "pb1-detectron2-0.6.tar.gz"
# Bumped whenever PLACEHOLDER_CPP changes, so that cached wheels of an older one are not reused.
PLACEHOLDER_VERSION = 2
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

PLACEHOLDER_CPP = """\
// Placeholder written by region_contrast's tools/install_detectron2.py.
// The pb1-detectron2 sdist ships without Detectron2's C++/CUDA sources, so this module
// defines no operator: deformable conv, rotated boxes and the C++ COCO evaluation are absent.
#include <string>

#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Detectron2 _C placeholder: no compiled operators";
  // Read by detectron2.utils.collect_env, which default_setup() logs at start-up.
  m.def("get_compiler_version", []() { return std::string("placeholder _C, no operators"); });
  m.def("get_cuda_version", []() { return std::string("not compiled"); });
  m.def("has_cuda", []() { return false; });
}
"""


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "region_contrast", "wheels")


def pip(*args):
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_wheel(wheel_dir, sdist=None):
    with tempfile.TemporaryDirectory(prefix="d2-build-") as tmp:
        if sdist is None:
            # --no-build-isolation: setup.py imports torch, so metadata needs the installed one.
            pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", SDIST,
                "-d", tmp)
            archive = os.path.join(tmp, SDIST_FILE)
            origin = f"The package index served a different {SDIST}"
        else:
            archive = sdist
            origin = f"It is not the {SDIST} sdist this script knows"
        digest = sha256(archive)
        if digest != SDIST_SHA256:
            sys.exit(
                f"error: {archive} has sha256 {digest}, expected {SDIST_SHA256}. {origin}; "
                "refusing to build it. Install an official Detectron2 build into this "
                "environment instead and re-run."
            )
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        src = os.path.join(tmp, SDIST_FILE[: -len(".tar.gz")])
        csrc = os.path.join(src, "detectron2", "layers", "csrc")
        os.makedirs(csrc, exist_ok=True)
        with open(os.path.join(csrc, "vision.cpp"), "w") as f:
            f.write(PLACEHOLDER_CPP)
        staging = os.path.join(tmp, "wheel")
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", staging, src)
        (built,) = glob.glob(os.path.join(staging, "*.whl"))
        os.makedirs(wheel_dir, exist_ok=True)
        # Rename into place so that an interrupted build never leaves a half-written wheel.
        target = os.path.join(wheel_dir, os.path.basename(built))
        shutil.copyfile(built, target + ".part")
        os.replace(target + ".part", target)
        return target


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=default_cache_dir(),
                        help="where built wheels are kept between environments")
    parser.add_argument("--force", action="store_true",
                        help="rebuild and reinstall even if Detectron2 is importable")
    parser.add_argument("--sdist", metavar="PATH",
                        help=f"build from this local {SDIST_FILE} instead of downloading it")
    args = parser.parse_args()
    # Checked first so that a wrong path fails at once, not after a cache miss.
    if args.sdist is not None and not os.path.isfile(args.sdist):
        sys.exit(f"error: --sdist {args.sdist}: no such file")

    if not args.force and importlib.util.find_spec("detectron2") is not None:
        import detectron2

        print(f"Detectron2 {detectron2.__version__} already importable from "
              f"{os.path.dirname(detectron2.__file__)}; keeping it.")
        return
    try:
        import torch
    except ImportError:
        sys.exit("error: torch is not installed in this environment; install the project "
                 "(pip install -e .) before running this script.")

    # The extension links against torch's C++ ABI, so a wheel only fits the torch it was
    # built with.
    tag = (
        f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        f"-placeholder{PLACEHOLDER_VERSION}"
    )
    wheel_dir = os.path.join(args.cache_dir, tag)
    cached = sorted(glob.glob(os.path.join(wheel_dir, "pb1_detectron2-0.6-*.whl")))
    if cached and not args.force:
        wheel = cached[-1]
        print(f"Using cached Detectron2 wheel {wheel}")
    else:
        print(f"Building Detectron2 v0.6 with a placeholder _C extension into {wheel_dir}")
        wheel = build_wheel(wheel_dir, args.sdist)
    pip("install", "--no-deps", "--force-reinstall", wheel)


if __name__ == "__main__":
    main()
