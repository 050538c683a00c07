"""agentloop: a durable agent runner."""
