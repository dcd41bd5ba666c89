"""The HTTP server (`router serve`): one Engine behind an OpenAI-compatible, batched, self-reloading ASGI app.

``create_app(engine_or_registry, settings)`` in :mod:`vlrouter.serve.app`; the limits in
:class:`vlrouter.serve.settings.ServeSettings`; the Python client in :mod:`vlrouter.client`.
"""

from vlrouter.serve.app import create_app
from vlrouter.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
