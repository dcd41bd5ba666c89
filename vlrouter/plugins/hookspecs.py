"""Every extension point of vlrouter. Plugins are plain modules of ``@hookimpl`` functions.

A plugin module looks like::

    from vlrouter import hookimpl, AdapterSpec

    @hookimpl
    def register_adapters(register):
        register(AdapterSpec(name="calendar", description="...", dataset="data/calendar/train.jsonl",
                             checkpoint="checkpoints/calendar-tasks"))

    @hookimpl
    def parse_action(adapter, text):
        if adapter == "calendar":
            return parse_call(text, {"click": {"x", "y"}})

Built-in plugins register exactly like third-party ones. Third-party packages expose
their module through the ``vlrouter`` entry-point group; a registry entry may also name
a module with ``plugin:`` (that imports code: registry.yaml is trusted config).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from vlrouter.core.actions import UIAction
    from vlrouter.core.recipe import Backend
    from vlrouter.plugins.manager import AdapterSpec

hookspec = pluggy.HookspecMarker("vlrouter")
hookimpl = pluggy.HookimplMarker("vlrouter")


@hookspec
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Declare adapters this plugin provides.

    Call ``register(AdapterSpec(...))`` once per adapter. ``AdapterSpec`` carries the
    name (the router label), a description, and default dataset and checkpoint paths
    (relative to the registry's folder) that ``router add-adapter NAME`` uses when no
    ``--dataset``/``--checkpoint`` is given. Two plugins declaring the same name is an
    error naming both.
    """


@hookspec(firstresult=True)
def parse_action(adapter: str, text: str) -> UIAction | None:
    """Turn the text generated with ``adapter`` active into a ``UIAction``.

    ``firstresult``: the first non-None answer wins, so return None for adapters you
    do not own and for text you cannot parse. The generic adapter answers last for
    every adapter with the shared ``name(key=value)`` parser.
    """


@hookspec
def register_backends(register: Callable[[str, Backend], None]) -> None:
    """Declare training backends: ``register(name, fn)``.

    ``fn(request: RetrainRequest) -> Candidate`` builds the routing dataset, embeds what
    is missing and fits a candidate router (see :mod:`vlrouter.core.recipe`); the eval
    gate and promotion then run on the caller's side, the same for every backend.
    Built-ins: ``local`` (default) and ``modal``. Selected by ``router retrain --backend
    NAME`` or ``train.backend`` in registry.yaml.
    """
