"""The `router` command (typer). The only place that prints and exits."""
