"""Domain layer: images, flavors and their rules. No gRPC and no SQL here."""
