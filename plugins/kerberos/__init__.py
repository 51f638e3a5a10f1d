"""Placeholder: the kerberos plugin is being written."""
