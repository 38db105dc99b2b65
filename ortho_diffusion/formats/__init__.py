"""Adapter files: the native format, loading (native, peft and LyCORIS files), exports."""

from .load import load_adapter, open_adapter, restore_adapter_values
from .native import AdapterFile, AdapterFileError, architecture_fingerprint, save_adapter

__all__ = [
    "AdapterFile",
    "AdapterFileError",
    "architecture_fingerprint",
    "load_adapter",
    "open_adapter",
    "restore_adapter_values",
    "save_adapter",
]
