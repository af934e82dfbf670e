"""Answer extractors, by name: each reads the final answer a completion states, or None.

- ``boxed``: the content of the last ``\\boxed{…}`` or ``\\fbox{…}`` with balanced braces (DeepSeek-R1's format).
- ``hashes``: the number after a final ``#### `` that ends the completion (GSM8K's format, the embedded task's).
- ``last_number``: the last number written anywhere (thousands commas dropped).
- ``regex``: the first group (or the whole match) of the last match of the benchmark's ``pattern`` (each search
  bounded in time).
- ``last_code_block``: the lines between the last two lines holding a ``` fence (LiveCodeBench's rule).
"""

import re
from collections.abc import Callable

import regex

from stages.errors import RacError

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES_RE = re.compile(r"####[ \t]+(-?\d[\d,]*(?:\.\d+)?)\s*\Z")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` or ``\\fbox{…}`` with balanced braces, or None if absent or unclosed."""
    openers = list(_BOX_RE.finditer(text))
    if not openers:
        return None
    start = openers[-1].end()
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":  # skip the escaped character, so \{ and \} are not braces
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _hashes(text: str) -> str | None:
    match = _HASHES_RE.search(text)
    return match.group(1).replace(",", "") if match else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


# A pattern that backtracks catastrophically (``(a|aa)+$``) can run for hours on one long completion: each search
# stops after this long (the ``regex`` module's timeout; the standard ``re`` has none).
REGEX_SECONDS = 2.0


def compile_pattern(pattern: str | None, where: str) -> regex.Pattern[str]:
    """``pattern`` compiled; a missing or invalid one is a one-line error naming ``where``."""
    if not pattern:
        raise RacError(f"{where}.pattern is not set; the regex extractor needs a pattern such as 'Answer: (\\S+)'")
    try:
        return regex.compile(pattern)
    except regex.error as err:
        raise RacError(f"{where}.pattern={pattern!r} does not compile ({err}); fix the regular expression") from err


def _by_regex(pattern: regex.Pattern[str], where: str) -> Callable[[str], str | None]:
    def extract(text: str) -> str | None:
        try:
            matches = list(pattern.finditer(text, timeout=REGEX_SECONDS))
        except TimeoutError as err:
            raise RacError(
                f"{where}.pattern={pattern.pattern!r} ran over {REGEX_SECONDS} s on a completion of {len(text)} "
                "characters (it backtracks catastrophically); anchor it, or drop nested repeats such as (a|aa)+"
            ) from err
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if pattern.groups else last.group(0)

    return extract


def last_code_block(text: str) -> str | None:
    """The lines between the last two lines that hold a fence, whatever their language tag; None with fewer."""
    lines = text.split("\n")
    fences = [i for i, line in enumerate(lines) if "```" in line]
    if len(fences) < 2:
        return None
    return "\n".join(lines[fences[-2] + 1 : fences[-1]])


FIXED: dict[str, Callable[[str], str | None]] = {
    "boxed": last_boxed,
    "hashes": _hashes,
    "last_number": _last_number,
    "last_code_block": last_code_block,
}
EXTRACTORS = (*FIXED, "regex")


def extractor(name: str, pattern: str | None, where: str) -> Callable[[str], str | None]:
    """The extractor called ``name`` (``regex`` uses ``pattern``); an unknown name is a one-line error."""
    if name == "regex":
        return _by_regex(compile_pattern(pattern, where), where)
    if name not in FIXED:
        raise RacError(f"{where}.extractor={name!r} is unknown; choose one of {list(EXTRACTORS)}")
    if pattern is not None:
        raise RacError(f"{where}.pattern is set but extractor={name!r} ignores it; set extractor: regex or drop it")
    return FIXED[name]
