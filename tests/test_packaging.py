"""The package's requirements leave the user's torch alone; `make` pins exact versions apart."""
import os
import tomllib

from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirements():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def constraints():
    with open(os.path.join(REPO, "constraints.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return {r.name: r for r in map(Requirement, filter(None, lines))}


def test_torch_is_a_range_that_keeps_an_installed_torch():
    reqs = requirements()
    # Releases users have with official Detectron2 builds, CUDA or CPU, and the GPU machines'.
    for name, versions in (("torch", ["2.0.1", "2.4.0", "2.11.0", "2.13.0+cpu", "2.14.1"]),
                           ("torchvision", ["0.15.2", "0.19.0", "0.26.0", "0.29.1"])):
        spec = reqs[name].specifier
        assert not any(s.operator in ("==", "===", "~=") for s in spec), (name, str(spec))
        for version in versions:
            assert spec.contains(version), (name, version, str(spec))


def test_make_pins_are_exact_and_allowed_by_the_ranges():
    reqs, pins = requirements(), constraints()
    for name in ("torch", "torchvision"):
        (pin,) = pins[name].specifier
        assert pin.operator == "=="
        assert reqs[name].specifier.contains(pin.version), (name, pin.version)
    with open(os.path.join(REPO, "Makefile")) as f:
        assert "-c constraints.txt" in f.read()
