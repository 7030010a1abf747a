"""The fleet's rules and use cases."""
