"""The content-addressed chunk store: every image a manifest of fixed-size
chunks named by their BLAKE3 hash, each stored once (README "Chunk store")."""
