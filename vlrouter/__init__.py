"""vlrouter: route a GUI agent's (screenshot, instruction) to the right LoRA adapter, then act.

Public API::

    from vlrouter import Engine
    engine = Engine.from_registry("registry.yaml")
    action = engine.act("screen.png", "Click March 29")

Plugins use :data:`hookimpl` and :class:`AdapterSpec`. ``import vlrouter`` does not import
torch or transformers; :class:`Engine`, :class:`Route`, :class:`Action` and :class:`UIAction`
load on first use.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlrouter")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from vlrouter.plugins.hookspecs import hookimpl  # noqa: E402
from vlrouter.plugins.manager import AdapterSpec  # noqa: E402

__all__ = ["AdapterSpec", "Action", "Engine", "Route", "UIAction", "__version__", "hookimpl"]

_LAZY = {"Engine": "vlrouter.core.engine", "Route": "vlrouter.core.results", "Action": "vlrouter.core.results",
         "UIAction": "vlrouter.core.actions"}


def __getattr__(name: str):
    """Engine, Route, Action and UIAction on first use (they pull in the engine room)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlrouter' has no attribute {name!r}")
