"""The prediction web service (FastAPI) and its single static page."""

from cxrdx.serve.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
