"""Prefect tasks: thin wrappers that build what the library needs and call it."""
