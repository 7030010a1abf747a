"""The image service's rules and use cases; imports nothing but common."""
