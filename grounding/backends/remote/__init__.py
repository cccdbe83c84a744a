"""Any OpenAI-compatible chat server (vLLM, SGLang, hosted Qwen-VL / DeepSeek-VL2 APIs)."""

from grounding.backends.remote.client import OpenAIBackend
from grounding.backends.remote.codec import json_schema
from grounding.backends.remote.retry import RemoteError

__all__ = ["OpenAIBackend", "RemoteError", "json_schema"]
