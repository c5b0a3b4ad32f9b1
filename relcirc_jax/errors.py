"""UserError: a mistake in the command, the config or the inputs, as opposed to a bug.

Its message is one line that names the problem and the fix; `relcirc_jax.main` prints just that line (no traceback
unless --verbosity=1 or more) and exits with status 2. It is a ValueError, so library callers may catch either.
"""


class UserError(ValueError):
    """A mistake the user can fix; str() is the one-line message the CLI prints."""
