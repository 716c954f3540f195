"""Shared cupboard: artifacts, model sources, registries, tracking. Imports nothing else of the project."""
