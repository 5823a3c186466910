"""Exceptions that reach the user as one clear line and a known exit code."""

from __future__ import annotations


class RayPruneError(Exception):
    """Base class of errors the CLI reports without a traceback.

    Attributes:
        exit_code: process exit status the CLI uses for this error.
    """

    exit_code: int = 1


class UsageError(RayPruneError):
    """Bad configuration or bad input named by the user (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more configuration problems, all reported together.

    Args:
        problems: one human-readable line per problem, each naming the field and value.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))
