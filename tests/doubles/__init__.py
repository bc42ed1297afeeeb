"""Test doubles: fake Azure Resource Manager, Azurite process helper, TLS certificates."""
