"""The one exception type that run.py turns into a single line and a non-zero exit.

Anything the user can fix (a config typo, a missing data folder, a corrupt
checkpoint, a diverged loss) raises ``UserError``; everything else is a bug and
keeps its traceback. ``quote`` and ``quote_key`` show a user's value in such a line.
"""

import reprlib


# Most characters of one value (a key, a path, a repr) quoted in an error message, so that the line keeps its reason.
QUOTE_LIMIT = 200


def cut(text: str) -> str:
    """``text`` cut to QUOTE_LIMIT characters, marked with "..." where it was cut."""
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, which never builds the whole text (that of a YAML alias bomb would not fit in
    memory). An integer too large for repr() (over 4300 digits) is told by its size."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 100, 100, 60
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 6

    def repr_int(self, x, level):
        if x.bit_length() > 256:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()


def quote(value) -> str:
    """``repr(value)`` for an error message: one line of at most QUOTE_LIMIT characters, however large the value."""
    return cut(_SHORT_REPR.repr(value))


def quote_key(key) -> str:
    """A key (or a dotted path of keys) as a message shows it: as written, unless it is no plain one-line string."""
    return cut(key) if isinstance(key, str) and key.isprintable() else quote(key)


class UserError(Exception):
    """An error caused by the user's input; its message is one self-contained line."""


class AllRanksError(UserError):
    """An error every data-parallel rank meets alike (the same config, checkpoint or number of ranks): under
    torchrun rank 0 alone reports it, so the user reads it once."""


class Diverged(AllRanksError):
    """Training stopped because a loss became NaN or infinite: a result of the configuration, not a typo.
    A single run exits with its one line; a sweep records the run as diverged and goes on. The ranks of a
    data-parallel run check their losses together, so they meet it alike."""
