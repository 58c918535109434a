"""The one exception family for bad user input: the CLI turns any of them into one line and exit status 2."""


class BadInput(ValueError):
    """Input a user can fix (unknown key, format, model, missing data path, ...). Raised before work starts."""
