"""The toolkit's error types for input a user can fix. Imports nothing of the project."""


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2, no traceback."""


class ConfigError(UserError, ValueError):
    """An out-of-range or unknown configuration value, raised where the value is checked (a model
    config, an environment spec, a compression strategy). A `ValueError` for code that calls the
    library directly, a `UserError` for the command line. A plain `ValueError` is a bug and keeps
    its traceback."""
