"""User-facing errors: one or two lines that say what was wrong and what to do."""


class LplError(ValueError):
    """A mistake in user input (a config value, a file, an argument).

    The CLI prints the message alone (no traceback) and exits with code 2.
    """
