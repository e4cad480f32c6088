"""One module per ``edgepack`` command: ``register(subparsers)`` and ``run(args) -> int``."""
