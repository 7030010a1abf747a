"""What operators see of a running service: Prometheus metrics, structured
logs with a request id per call, and health that follows its dependencies."""
