"""User-facing errors: one line that says what is wrong and how to fix it.

The CLI catches `FnscaleError`, prints `error: <message>` to stderr and exits with `exit_code`
(2 for usage or data mistakes, 1 for runtime failures, 130 after Ctrl-C), without a traceback unless --debug.
"""


class FnscaleError(Exception):
    """A mistake the user can fix; `str(err)` is the whole message."""

    exit_code = 2


class UsageError(FnscaleError):
    """Bad flags, paths, data or templates (exit code 2)."""

    exit_code = 2


class RunError(FnscaleError):
    """The run failed for a reason outside the user's input (exit code 1), e.g. a full disk."""

    exit_code = 1


class Interrupted(FnscaleError):
    """Stopped by Ctrl-C (exit code 130, the shell's convention for SIGINT); the message says how to resume."""

    exit_code = 130
