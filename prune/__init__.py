"""dsc.prune — structured pruning (heads, MLP channels, layers, MoE experts). Stages land here."""
