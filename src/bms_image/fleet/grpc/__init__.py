"""Thin servicers of ProvisioningService and ServerCaptureService: proto <-> domain."""
