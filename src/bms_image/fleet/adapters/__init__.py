"""What the fleet drives: its database tables, the image service, first boot."""
