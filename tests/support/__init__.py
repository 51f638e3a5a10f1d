"""Helpers the tests share: real processes on loopback, started and stopped by PID."""
