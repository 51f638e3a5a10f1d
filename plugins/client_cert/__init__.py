"""Placeholder: the client_cert plugin is being written."""
