"""`modes serve`: transformers' OpenAI-compatible server with a plan applied."""

from modes.serving.server import build_app, serve

__all__ = ["build_app", "serve"]
