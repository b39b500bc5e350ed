"""The refiner HTTP server: batched ``/v1/refine``, an OpenAI-compatible refining proxy, metrics.

Needs the ``server`` extra. Run it with ``diffpo serve`` or ``python -m diffpo_sdk.server``.
"""

from .app import create_app
from .config import ServerConfig, check_bind, is_loopback

__all__ = ["ServerConfig", "check_bind", "create_app", "is_loopback"]
