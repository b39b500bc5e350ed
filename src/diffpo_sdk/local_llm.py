"""The documented old path of :mod:`diffpo_sdk.apps.local_llm`: the same module object; ``python -m diffpo_sdk.local_llm`` runs its main."""

import sys

from .apps import local_llm as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
