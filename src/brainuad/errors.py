"""Exceptions raised on bad input, so callers can tell them from bugs."""


class InputError(ValueError):
    """A file or value given to brainuad is unusable.

    The message always names the file (or config field) and what is wrong with it.
    """
