"""Names inside a run directory that come from the user: the history's columns, and the
checkpoint names a pattern makes from them, as Keras' ModelCheckpoint fills its file path.
The config's validator and the run directory both check patterns here, so that a pattern the
config accepts is one the run can use.

>>> checkpoint_name("model1_{epoch:02d}", 3)
'model1_03'
"""

from __future__ import annotations

import math
import re
import string

from ..errors import SpecError

# history.csv's columns: an epoch (counting from 1) and its logs
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "penalty", "lr", "seconds"]

# The fields a checkpoint name may use, as Keras' ModelCheckpoint fills its file path: the
# epoch (counting from 1) and that epoch's logs.
PATTERN_FIELDS = tuple(HISTORY_COLUMNS)
# Longest checkpoint name a pattern may give for typical values (a file name's limit is 255
# bytes; a huge loss printed with "f" may still make one longer later), and the largest width
# or precision in its format specs.
PATTERN_NAME_LIMIT = 160  # characters
# A format spec's fill character, width and precision ("{epoch:02d}", "{val_loss:.4f}",
# "{epoch:_>3}"): checked before any formatting, which would otherwise build a string as long
# as the width asks, and put its fill character in names.
_SPEC_PARTS = re.compile(r"(?:(?P<fill>.)?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?"
                         r"(?:\.(?P<precision>\d+))?[a-zA-Z%]?", re.S)
# Values that show what a pattern makes: the shortest ("0" with "g") pad the most, the longest
# show the most digits, NaN is what a missing log gives.
_SAMPLE_VALUES = ((1, 0.0), (1, 0.5), (999, 123.456), (1, math.nan))


def _plain_text(text: str) -> bool:
    """Printable, with no path separator or NUL: fit for a file name."""
    return text.isprintable() and not any(c in text for c in "/\\\0")


def _shown(text: str, limit: int = 80) -> str:
    """`text` as a repr, cut to about `limit` characters: an error line stays short."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def checkpoint_name(pattern: str, epoch: int, logs: dict | None = None) -> str:
    """A checkpoint's name from its pattern, as Keras' ModelCheckpoint fills a file path:
    `epoch` (1-based) and the epoch's logs, with their format specs. A log value the epoch
    lacks is NaN ("nan").

    >>> checkpoint_name("{epoch:02d}-{val_loss:.2f}", 3, {"val_loss": 0.3141})
    '03-0.31'
    """
    values = {name: math.nan for name in PATTERN_FIELDS}
    values.update({k: v for k, v in (logs or {}).items()
                   if k in values and isinstance(v, (int, float))})
    values["epoch"] = int(epoch)
    return pattern.format(**values)


def check_checkpoint_pattern(pattern: str, setting: str = "checkpoint.filename") -> set[str]:
    """The fields a checkpoint name pattern uses; SpecError (one line, naming the pattern)
    where it cannot name checkpoints: longer than PATTERN_NAME_LIMIT, a field it does not fill (attributes and indexes
    included), a bad or nested format spec ("{loss:d}", "{epoch:{lr}}"), a width above
    PATTERN_NAME_LIMIT, a name that is a path, hidden, taken ('best', 'interrupted_...') or
    too long.

    >>> sorted(check_checkpoint_pattern("{epoch:02d}-{val_loss:.2f}"))
    ['epoch', 'val_loss']
    """
    if not isinstance(pattern, str):
        raise SpecError(f"[checkpoint] filename must be a string, got {type(pattern).__name__}",
                        setting=setting)

    def refuse(why: str) -> SpecError:
        # one line whatever a library's message quotes (parts of the pattern are shown escaped)
        return SpecError(f"[checkpoint] filename {_shown(pattern)}: {' '.join(why.splitlines())}",
                         setting=setting)

    if len(pattern) > PATTERN_NAME_LIMIT:  # its names would be longer still
        raise refuse(f"a pattern has at most {PATTERN_NAME_LIMIT} characters")
    used = set()
    try:
        parts = list(string.Formatter().parse(pattern))
    except ValueError as exc:  # unbalanced braces
        raise refuse(str(exc)) from None
    for _, field, spec, _ in parts:
        if field is None:
            continue
        if field not in PATTERN_FIELDS:
            known = ", ".join("{" + f + "}" for f in PATTERN_FIELDS[1:])
            raise refuse(f"{_shown('{' + field + '}')} is not a field it fills; a name may "
                         f"use only {{epoch}} "
                         f"and the epoch's logs ({known}), e.g. \"model1_{{epoch:02d}}\"")
        if "{" in spec or "}" in spec:
            raise refuse("a format spec inside a format spec is not supported")
        sizes = _SPEC_PARTS.fullmatch(spec)
        if sizes and any(int(sizes[n] or 0) > PATTERN_NAME_LIMIT for n in ("width", "precision")):
            raise refuse(f"the width or precision in {_shown(spec)} is above {PATTERN_NAME_LIMIT}")
        if sizes and sizes["fill"] is not None and not _plain_text(sizes["fill"]):
            raise refuse(f"fill character {sizes['fill']!r} would put a path separator or an "
                         f"unprintable character in names")
        used.add(field)
    try:
        samples = [checkpoint_name(pattern, epoch, dict.fromkeys(PATTERN_FIELDS, value))
                   for epoch, value in _SAMPLE_VALUES]
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise refuse(f"{exc} (epoch is an integer, the logs are floats)") from None
    for name in samples:
        if len(name) > PATTERN_NAME_LIMIT:
            raise refuse(f"gives names of {len(name)} characters (at most {PATTERN_NAME_LIMIT})")
        if not _plain_text(name) or name in ("", ".", ".."):
            raise refuse(f"must give a plain, printable name, not a path (it gives {_shown(name)})")
        if name == "best" or name.startswith(("interrupted_", ".")):
            raise refuse("'best', 'interrupted_...' and hidden names are taken")
    return used
