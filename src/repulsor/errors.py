"""The one exception type for user mistakes."""


class UserError(Exception):
    """A mistake the user can fix: a wrong path, a malformed file, a bad setting.

    The command line prints ``str(error)`` on one line and exits with status 2,
    without a traceback. The message names what is wrong and how to fix it.
    """


class Interrupted(UserError):
    """The user stopped a command (Ctrl-C, SIGTERM) after its work so far was saved.

    The command line prints the message, which says how to continue, and exits with
    status 130, whichever command was stopped.
    """
