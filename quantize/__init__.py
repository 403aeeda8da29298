"""dsc.quantize — AWQ 4-bit and INT8 weight quantization. Stages land here."""
