"""Built-in adapter plugins: the seed's three tasks and the generic JSONL adapter.

Each is a plain module of ``@hookimpl`` functions, registered exactly like a
third-party plugin (see ``vlrouter.plugins.manager.BUILTIN_PLUGINS``).
"""
