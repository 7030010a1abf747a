"""The simulated bare-metal fleet. It reaches images only through
ImageService over gRPC, with the caller's token, and verifies every byte."""
