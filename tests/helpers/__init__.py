"""Shared test helpers (comparison, crash-test writer). Not part of ckptstore."""
