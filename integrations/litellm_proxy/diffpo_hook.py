"""Loaded by the LiteLLM proxy (``callbacks: diffpo_hook.proxy_handler_instance``).

Refiner settings come from ``DIFFPO_*`` environment variables; see config.yaml.
"""

from diffpo_sdk.litellm_hook import DiffPOProxyHook

proxy_handler_instance = DiffPOProxyHook()
