"""The library version, written into every adapter file it saves."""

__version__ = "0.1.0"
