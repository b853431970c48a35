"""Fault tests: real worker processes, real signals, a real database being restarted."""
