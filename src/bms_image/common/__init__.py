"""What both processes use: errors, the shared model, paging, the call guard,
tokens, TLS, settings, the simulated-disk format, telemetry."""
