"""Model concerns: loading (hub, folder, GGUF), cached paths, attention, placement, MLP discovery, hub upload."""
