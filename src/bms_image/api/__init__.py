"""gRPC layer: thin servicers translating proto <-> domain, errors -> status."""
