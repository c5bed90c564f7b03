"""Request handlers between the wire models and the engine (one module per endpoint)."""
