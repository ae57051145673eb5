"""Public name of METHOD.md (``region_contrast.loss.region_contrast_loss``); the code is in
:mod:`region_contrast.modeling.loss`."""
from .modeling.loss import *  # noqa: F401,F403
from .modeling.loss import __all__  # noqa: F401
