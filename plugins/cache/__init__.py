"""Placeholder: the cache plugin is being written."""
