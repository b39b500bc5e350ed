"""Framework adapters: LangChain (runnable, chat model, agent middleware) and LiteLLM (wrappers, proxy hook)."""
