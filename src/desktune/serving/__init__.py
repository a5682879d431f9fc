"""`desktune serve`: an OpenAI-compatible HTTP API for a base model and its LoRA adapters (FastAPI + uvicorn)."""

from desktune.serving.settings import API_KEY_ENV, Limits, ServeSettings, parse_adapters

__all__ = ["API_KEY_ENV", "Limits", "ServeSettings", "parse_adapters"]
