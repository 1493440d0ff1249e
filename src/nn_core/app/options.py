"""What every subcommand shares: the usage error, the parser, option types, output helpers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..checks import number_range
from ..errors import NNCoreError

PROG = "nn-core"


class UsageError(NNCoreError):
    """A bad command line (option value, combination of options): exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors raise UsageError (one line on stderr, exit 2) instead of
    printing the usage block."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ---- option value types (argparse turns their ArgumentTypeError into a usage error) -----


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def float_in(low: float, high: float, low_ok: bool, high_ok: bool) -> Callable[[str], float]:
    desc = f"a number in {number_range(low, high, not low_ok, not high_ok)}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text!r}") from None
        above = value > low or (low_ok and value == low)
        below = value < high or (high_ok and value == high)
        if not (above and below):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {desc}, got {text}")
        return value

    parse.__name__ = desc
    return parse


pos_int = int_at_least(1)
nonneg_int = int_at_least(0)
pos_float = float_in(0.0, float("inf"), False, False)
temperature = float_in(0.0, float("inf"), True, False)
top_p = float_in(0.0, 1.0, False, True)
fraction = float_in(0.0, 1.0, False, False)


def add_config_options(p: argparse.ArgumentParser, what: str) -> None:
    """--config NAME|FILE and --set KEY=VALUE (repeatable), the one override syntax."""
    p.add_argument(
        "--config",
        metavar="NAME|FILE",
        help="preset (tiny, small, default_6_9b) or a .toml/.json config file (default tiny)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a {what} field (repeatable), e.g. --set hidden_dim=128",
    )


def check_utf8(value: str, option: str, advice: str) -> None:
    """Refuse an argument holding bytes that are not UTF-8 (Python keeps them as surrogate
    escapes, which cannot be encoded)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = value[exc.start].encode("utf-8", "surrogateescape")
        raise UsageError(
            f"{option} is not valid UTF-8 (byte 0x{byte.hex()} at character {exc.start}); {advice}"
        ) from None


# ---- output ------------------------------------------------------------------------------


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def say(*parts: Any) -> None:
    """A line on stdout, flushed (progress goes to stderr, results here)."""
    print(*parts, flush=True)


def note(text: str) -> None:
    """A line on stderr: something the user should know that is not an error."""
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)
