"""Runbooks of the example plug-in: every *.toml file in this directory."""
