"""Backends run a model: a batch of images + prompts in, texts + model frames out."""

from grounding.backends.base import Backend, Generation, Request

__all__ = ["Backend", "Generation", "Request"]
