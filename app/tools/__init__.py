"""Tools the agent can call: a registry, built-ins, the demo tools."""
