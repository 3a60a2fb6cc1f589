"""The registry's errors: each message names the registry path and what is wrong."""
from __future__ import annotations


class RegistryError(RuntimeError):
    """A registry that cannot be used as asked: the message names the directory and what is wrong."""


class RegistryBusy(RegistryError):
    """Another retrain holds the registry's lock."""
