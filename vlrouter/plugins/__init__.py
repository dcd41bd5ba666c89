"""Extension points (``hookspecs``) and the plugin manager that discovers plugins."""
