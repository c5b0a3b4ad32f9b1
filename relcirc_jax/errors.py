"""UserError: a mistake in the command, the config or the inputs, as opposed to a bug.

Its message is one line that names the problem and the fix; the command-line entries (`relcirc_jax.main`,
`relcirc_jax.pretrained`) print just that line with `fail` (no traceback unless --verbosity=1 or more) and exit with
status 2. It is a ValueError, so library callers may catch either.
"""

import sys
from typing import NoReturn


class UserError(ValueError):
    """A mistake the user can fix; str() is the one-line message the CLI prints."""


def fail(message: str) -> NoReturn:
    """The command-line end of a UserError: its one line on stderr, exit status 2."""
    print(f"Error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
