"""What the image service's domain drives: the database, blobs, the format
inspector, the catalog seeder, captures by a provisioner."""
