"""Persistence: the schema, the migrations, and every SQL statement (repo.py)."""
