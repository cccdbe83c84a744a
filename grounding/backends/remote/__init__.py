"""Any OpenAI-compatible chat server (vLLM, SGLang, hosted Qwen-VL / DeepSeek-VL2 APIs)."""

from grounding.backends.remote.client import OpenAIBackend, RemoteError, json_schema

__all__ = ["OpenAIBackend", "RemoteError", "json_schema"]
