"""The one error type users see: a one-line message and exit code 2, never a traceback."""


class UsageError(Exception):
    """Bad input from the user (config, flag, file). The CLIs print the message and exit with code 2.

    The message names the file, key or value at fault and what would be valid. It may hold several lines
    when several independent problems were found at once (config validation reports all of them).
    """

    exit_code = 2
