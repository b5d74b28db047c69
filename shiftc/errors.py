"""One error type for everything a user can get wrong.

Every failure that is the input's fault (a bad file, an unsupported op, a wrong flag, a wrong
tensor shape) raises :class:`ShiftcError` with a message naming the file, node, tensor or flag at
fault and what to do. The CLI prints it on stderr and exits with :attr:`ShiftcError.exit_code`.
Anything else escaping is a bug in shiftc.
"""

from __future__ import annotations

# Exit codes of the CLI (documented in README.md).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: an unexpected exception
EXIT_USAGE = 2  # bad flags or arguments (argparse uses 2 as well)
EXIT_BAD_INPUT = 3  # the model/data file is malformed, unsafe or unsupported
EXIT_UNSUPPORTED = 4  # well-formed input that shiftc cannot handle (an op it cannot lower, ...)
EXIT_RUNTIME = 5  # inputs of wrong shape/dtype at run time, a failed run


class ShiftcError(Exception):
    """A user-facing error: one clear message and an exit code."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BadInputError(ShiftcError):
    """A file that is malformed, truncated, unsafe (path traversal) or missing."""

    exit_code = EXIT_BAD_INPUT


class UnsupportedError(ShiftcError):
    """Valid input that shiftc cannot handle (an op without a converter, an architecture)."""

    exit_code = EXIT_UNSUPPORTED


class UsageError(ShiftcError):
    """A bad flag or argument value."""

    exit_code = EXIT_USAGE


class RuntimeInputError(ShiftcError):
    """Inputs given to a compiled model that do not match its signature."""

    exit_code = EXIT_RUNTIME
