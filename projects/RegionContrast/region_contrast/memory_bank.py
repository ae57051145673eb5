"""Public name of METHOD.md (``region_contrast.memory_bank.RegionMemoryBank``); the code is in
:mod:`region_contrast.modeling.memory_bank`."""
from .modeling.memory_bank import *  # noqa: F401,F403
from .modeling.memory_bank import __all__  # noqa: F401
