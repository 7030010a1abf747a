"""The image service: public, private and shared images, their bytes, and members."""
