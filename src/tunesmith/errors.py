"""One exception type for every error a user can fix; the CLI prints it without a traceback."""


class TunesmithError(Exception):
    """A problem with the user's input or environment, worded as what happened and what to do."""
