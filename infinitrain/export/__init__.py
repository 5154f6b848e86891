"""Hugging Face interop: export to the HF format (loads with trust_remote_code), import Llama."""

from .hf import ExportError, export_hf, load_exported
from .llama import DEFAULT_GATE_INIT, LlamaImport, LlamaImportError, import_llama

__all__ = [
    "DEFAULT_GATE_INIT",
    "ExportError",
    "LlamaImport",
    "LlamaImportError",
    "export_hf",
    "import_llama",
    "load_exported",
]
