"""The refiner engine: model loading, chat templating and KV-cached block-Jacobi decoding.

Needs the ``engine`` extra (torch, transformers). Never imports LangChain or LiteLLM.
"""

from .engine import RefineResult, RefinerEngine

__all__ = ["RefineResult", "RefinerEngine"]
