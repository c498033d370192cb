"""`modes serve`: an OpenAI-compatible chat-completions server with a plan applied."""

from modes.serving.server import ServedModel, build_app, serve

__all__ = ["ServedModel", "build_app", "serve"]
