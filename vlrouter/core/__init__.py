"""The engine room: registry, data, encoder, features, head training, the router store, the engine."""
