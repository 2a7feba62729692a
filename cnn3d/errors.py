"""Errors a user can fix. CLIs print them as one line and exit with code 2."""


class UserError(Exception):
    """Bad input (a key, a value, a path, a model name): the message says what was wrong and what would be right."""

    exit_code = 2
