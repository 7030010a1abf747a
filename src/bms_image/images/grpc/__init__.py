"""Thin servicers of ImageService and SharingService: proto <-> domain."""
