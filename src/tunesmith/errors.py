"""One exception type for every error a user can fix; the CLI prints it without a traceback."""


class TunesmithError(Exception):
    """A problem with the user's input or environment, worded as what happened and what to do."""


MAX_ERROR_CHARS = 2000


def capped(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message of at most about ``limit`` characters: a message that echoes user input (a value, a
    YAML node) can be arbitrarily long, and one line must stay one line a terminal can show."""
    if len(message) <= limit:
        return message
    half = limit // 2
    return f"{message[:half]} … [{len(message) - 2 * half:,} characters left out] … {message[-half:]}"
