"""The ``grounding`` command line."""

from grounding.cli.app import app

__all__ = ["app"]
