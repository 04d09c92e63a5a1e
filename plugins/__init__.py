"""gptx's built-in components. Each module is a plugin like any third-party one: it implements
a ``register_*`` hook with ``trylast=True``, so an installed package can override any name."""
