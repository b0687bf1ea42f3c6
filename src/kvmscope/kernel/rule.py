"""One kernel behaviour as data (:class:`Rule`) and kernel versions as tuples: the vocabulary of kernel/rulesets.py
and kernel/emulated.py."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidValueError

Version = tuple[int, int, int]
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(?:[-+_~].*)?")
OLDEST: Version = (5, 10, 0)  # the oldest kernel whose rules the model was checked against
AFTER_KNOWN: Version = (1 << 30, 0, 0)  # a mainline release after every one the model knows ("> 6.18", Rule.since)

def parse_version(text: str) -> Version:
    """``"6.18"`` -> (6, 18, 0); ``"6.12.118-fc"`` -> (6, 12, 118)."""
    if not isinstance(text, str) or len(text) > 32:  # "6." and 5,000 nines would not fit an int conversion
        raise InvalidValueError(f"kernel version {str(text)[:40]!r} is not like 6.18 or 6.18.44")
    m = _VERSION.fullmatch(text.strip())
    if m is None:
        raise InvalidValueError(f"kernel version {text!r} is not like 6.18 or 6.18.44")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def label(v: Version) -> str:
    return f"{v[0]}.{v[1]}" if v[2] == 0 else f"{v[0]}.{v[1]}.{v[2]}"


@dataclass(frozen=True)
class Rule:
    """A kernel behaviour the model implements: where it came from, and what a VMM can do when it refuses something.

    ``since`` is the first mainline release with the rule ("-" for facts that hold on every version the model knows,
    such as a host's observed behaviour; "> 6.18" for a release after the newest one the model knows, not pinned,
    which only the ``stable`` backports bring into a known series); ``until`` the first mainline release without it;
    ``stable`` and ``stable_until`` the stable releases that received the rule or its removal (e.g. ``("6.12.77",)``).
    """

    key: str
    since: str
    commit: str
    title: str
    hint: str = ""  # what a VMM can do about a refusal by this rule
    until: str | None = None
    removed_by: str = ""  # the commit that removed it (with ``until``)
    stable: tuple[str, ...] = ()
    stable_until: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for v in (self.until, *self.stable, *self.stable_until):
            if v is not None:
                parse_version(v)

    def cite(self) -> str:
        if self.since == "-":  # a fact of every version, or of the host: no release or commit to name
            return self.title
        since = self.since if self.until is None else f"< {self.until} (removed in {self.until} by {self.removed_by})"
        return f"{self.title} (since {since}, {self.commit})"

    def __str__(self) -> str:
        return self.cite()

    @property
    def start(self) -> Version | None:
        """The first mainline release with the rule; None when it predates every version the model knows ("-",
        "< 5.10", "2.6.x")."""
        if self.since.startswith(">"):
            return AFTER_KNOWN
        if not re.fullmatch(r"\d+\.\d+(\.\d+)?", self.since):
            return None
        v = parse_version(self.since)
        return v if v >= OLDEST else None

    def in_force(self, version: Version) -> bool:
        """Whether a kernel of ``version`` (mainline or stable) has this rule."""

        def reached(mainline: Version | None, stable: tuple[str, ...]) -> bool:
            if mainline is not None and version >= mainline:
                return True
            return any(version[:2] == s[:2] and version >= s for s in map(parse_version, stable))

        started = self.start is None or reached(self.start, self.stable)
        ended = self.until is not None and reached(parse_version(self.until), self.stable_until)
        return started and not ended

    def versions(self) -> list[Version]:
        """The releases where this rule starts or stops applying."""
        start = None if self.start == AFTER_KNOWN else self.start
        out = [v for v in (start, None if self.until is None else parse_version(self.until)) if v is not None]
        return out + [parse_version(s) for s in (*self.stable, *self.stable_until)]
