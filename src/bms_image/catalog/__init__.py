"""The public image catalog and the flavors, shipped as data and seeded on start."""
