"""Training backends, registered as plugins through ``register_backends``: local, modal."""
