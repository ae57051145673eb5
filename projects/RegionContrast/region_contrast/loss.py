"""
``region_contrast.loss.region_contrast_loss``: a documented import path (docs/method.md);
it stays so that code written against it keeps working. The code is in
:mod:`region_contrast.modeling.loss`, beside the rest of the model.
"""
from .modeling.loss import *  # noqa: F401,F403
from .modeling.loss import __all__  # noqa: F401
