"""Shared fixtures. Server fixtures live in tests/support/, one module per server."""
