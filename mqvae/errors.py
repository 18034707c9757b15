"""The one exception type that run.py turns into a single line and a non-zero exit.

Anything the user can fix (a config typo, a missing data folder, a corrupt
checkpoint, a diverged loss) raises ``UserError``; everything else is a bug and
keeps its traceback.
"""


# Most characters of one value (a key, a path, a repr) quoted in an error message, so that the line keeps its reason.
QUOTE_LIMIT = 200


def cut(text: str) -> str:
    """``text`` cut to QUOTE_LIMIT characters, marked with "..." where it was cut."""
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


class UserError(Exception):
    """An error caused by the user's input; its message is one self-contained line."""


class AllRanksError(UserError):
    """An error every data-parallel rank meets alike (the same config, checkpoint or number of ranks): under
    torchrun rank 0 alone reports it, so the user reads it once."""


class Diverged(AllRanksError):
    """Training stopped because a loss became NaN or infinite: a result of the configuration, not a typo.
    A single run exits with its one line; a sweep records the run as diverged and goes on. The ranks of a
    data-parallel run check their losses together, so they meet it alike."""
