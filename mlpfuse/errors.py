"""Exceptions with a meaning for the exit code; the CLI prints them as one line."""


class MlpfuseError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class InputError(MlpfuseError):
    """Bad input: a missing path, a bad flag value, an unsupported model, an existing output."""

    exit_code = 2


class EnvironmentProblem(MlpfuseError):
    """Something missing around the input: no network for a hub id, no GPU, a backend not installed."""

    exit_code = 3
