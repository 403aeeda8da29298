"""dsc.export: artifacts for the runtimes people deploy with (GGUF for llama.cpp)."""
