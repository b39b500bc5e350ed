"""The documented old path of :mod:`diffpo_sdk.apps.demo`: the same module object; ``python -m diffpo_sdk.demo`` runs its main."""

import sys

from .apps import demo as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
