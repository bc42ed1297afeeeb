"""standby provider for Azure."""
