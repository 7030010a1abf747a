"""bms-image: the image service of a bare-metal-server cloud."""
