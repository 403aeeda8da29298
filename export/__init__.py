"""dsc.export: the Lite model as files for the runtimes people deploy with (GGUF for llama.cpp)."""
from dsc.export.stage import ExportConfig, apply, export_gguf

__all__ = ["ExportConfig", "apply", "export_gguf"]
