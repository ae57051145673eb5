"""
``region_contrast.regions.region_centers``: a documented import path (docs/method.md);
it stays so that code written against it keeps working. The code is in
:mod:`region_contrast.modeling.regions`, beside the rest of the model.
"""
from .modeling.regions import *  # noqa: F401,F403
from .modeling.regions import __all__  # noqa: F401
