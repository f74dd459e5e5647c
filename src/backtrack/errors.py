"""User-facing errors.

Anything a user can cause (bad file, bad row, unknown key) raises `UserError`; the CLI prints
its message on one line and exits with code 2. Bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by input the user can fix. The message must name the file/row/key."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
