"""The documented old path of :mod:`diffpo_sdk.adapters.convert`: the same module object, so patching either patches both."""

import sys

from .adapters import convert as _module

sys.modules[__name__] = _module
