"""Adapter files: the native format (and, later, exports to other tools' formats)."""

from .native import (
    AdapterFile,
    AdapterFileError,
    architecture_fingerprint,
    load_adapter,
    restore_adapter_values,
    save_adapter,
)

__all__ = [
    "AdapterFile",
    "AdapterFileError",
    "architecture_fingerprint",
    "load_adapter",
    "restore_adapter_values",
    "save_adapter",
]
