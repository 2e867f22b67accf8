"""The one user-facing exception type.

Anything a user can cause (bad input, bad options, a folder that is not what it claims to be) raises
`BertforgeError` with a one-line message that says what is wrong and what to do. The CLI prints it
as `bertforge: error: MESSAGE` on stderr and exits with status 2; `--debug` shows the traceback.
"""


class BertforgeError(Exception):
    """A problem with the user's input or environment, explained in one line."""
