"""Public name of METHOD.md (``region_contrast.regions.region_centers``); the code is in
:mod:`region_contrast.modeling.regions`."""
from .modeling.regions import *  # noqa: F401,F403
from .modeling.regions import __all__  # noqa: F401
