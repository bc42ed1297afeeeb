"""standby provider for AWS."""
