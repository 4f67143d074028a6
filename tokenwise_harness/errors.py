"""The one user-facing error type.

Anything raised as HarnessError is bad input that the user can fix: the CLI prints its
message on one line and exits with code 2, the pytest plugin turns it into a usage error.
Messages name the file or flag at fault and say what to do.
"""


class HarnessError(Exception):
    """Bad input: one line naming the file or flag and what to do."""

    exit_code = 2
