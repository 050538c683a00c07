"""Test support: tools, runbooks, a scripted planner, fixtures."""
