"""Writes of the registry: every door (admin, API, commands, tasks) calls these functions."""
