"""vlrouter: route a GUI agent's (screenshot, instruction) to the right LoRA adapter, then act.

Public API::

    from vlrouter import Engine
    engine = Engine.from_registry("registry.yaml")
    action = engine.act("screen.png", "Click March 29")

Plugins use :data:`hookimpl` and :class:`AdapterSpec`.
"""

from vlrouter.plugins.hookspecs import hookimpl
from vlrouter.plugins.manager import AdapterSpec

__version__ = "0.1.0"

__all__ = ["AdapterSpec", "Action", "Engine", "Route", "UIAction", "__version__", "hookimpl"]


def __getattr__(name):  # lazy: `import vlrouter` must not import torch/transformers
    if name in ("Engine", "Route", "Action"):
        from vlrouter.core import engine

        return getattr(engine, name)
    if name == "UIAction":
        from vlrouter.core.actions import UIAction

        return UIAction
    raise AttributeError(f"module 'vlrouter' has no attribute {name!r}")
