"""The documented old path of :mod:`diffpo_sdk.adapters.chat_model`: the same module object, so patching either patches both."""

import sys

from .adapters import chat_model as _module

sys.modules[__name__] = _module
