"""The documented old path of :mod:`diffpo_sdk.adapters.agents`: the same module object, so patching either patches both."""

import sys

from .adapters import agents as _module

sys.modules[__name__] = _module
