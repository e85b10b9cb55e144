"""The toolkit's one error type for input a user can fix. Imports nothing of the project."""


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2, no traceback."""
