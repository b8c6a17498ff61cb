"""Benchmarks behind ``smartbeam bench NAME``; each module exposes
``add_arguments(parser)`` and ``run(args) -> dict`` (the JSON figures)."""
