"""Blob stores: local files and S3."""
