"""Planners: the offline runbook planner and Claude through the anthropic SDK."""
