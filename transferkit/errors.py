"""Errors a user can fix. The CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing path, an empty folder, a bad flag value. Never shown with a traceback."""


class UnreadableImage(UserError):
    """A file that cannot be used as an image; the message is the reason shown in skip lists."""
