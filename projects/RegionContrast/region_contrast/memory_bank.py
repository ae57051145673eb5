"""
``region_contrast.memory_bank.RegionMemoryBank``: a documented import path (docs/method.md);
it stays so that code written against it keeps working. The code is in
:mod:`region_contrast.modeling.memory_bank`, beside the rest of the model.
"""
from .modeling.memory_bank import *  # noqa: F401,F403
from .modeling.memory_bank import __all__  # noqa: F401
