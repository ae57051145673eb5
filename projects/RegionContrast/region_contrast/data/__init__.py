"""Data sets of the project; importing registers them in Detectron2's catalogs."""
from . import digit_scenes  # noqa: F401
