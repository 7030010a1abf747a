"""Image bytes: a local staging area for uploads in progress, and a blob store
(local files or an S3-compatible object store) for the immutable bytes of
active images."""
