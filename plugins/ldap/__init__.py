"""Placeholder: the ldap plugin is being written."""
