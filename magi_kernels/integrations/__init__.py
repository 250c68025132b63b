"""Integrations with other libraries' models (optional dependencies, imported on use)."""
