"""An example agentloop plug-in (docs/tools.md, docs/runbooks.md)."""
