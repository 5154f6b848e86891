"""Hugging Face interop: export to the HF format (loads with trust_remote_code), import Llama.

Reading an export back as the core model is `infinitrain.inference.loading.load_exported`."""

from .hf import ExportError, export_hf
from .llama import DEFAULT_GATE_INIT, LlamaImport, LlamaImportError, import_llama

__all__ = [
    "DEFAULT_GATE_INIT",
    "ExportError",
    "LlamaImport",
    "LlamaImportError",
    "export_hf",
    "import_llama",
]
