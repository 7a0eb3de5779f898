"""Job handlers: the context handed to them, and the built-in ones."""
