"""Sub-commands of the ``smartbeam`` CLI; each module exposes ``register(subparsers)``."""
