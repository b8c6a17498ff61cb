"""Document-stream consumers that turn raw events into derived streams of the same run."""

from .derived import DerivedStreamRouter, data_key_for

__all__ = ["DerivedStreamRouter", "data_key_for"]
