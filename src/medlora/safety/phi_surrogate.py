"""Surrogates: each identifier replaced by a realistic fake of the same type, so training text stays natural.

One `Surrogates` serves one conversation: the same person keeps the same fake name ('Maria Lopez', then 'Mrs.
Lopez', map to one fake surname), every date moves by the same number of days (intervals survive), and numbers
keep their shape. The fakes come from Faker seeded by the run's seed and the conversation's text: a rebuild gives
the same data, two conversations get different people. Nothing of the mapping is kept or logged.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import random
import re

from faker import Faker

_MONTHS = {name.lower(): n for n, name in enumerate(calendar.month_name) if name}
_MONTHS.update({name.lower(): n for n, name in enumerate(calendar.month_abbr) if name})
_MONTHS["sept"] = 9
_WEEKDAY = re.compile(r"(?i)^((?:mon|tue|tues|wed|thu|thur|thurs|fri|sat|sun)(?:day|nesday|rsday|urday)?\.?,?\s+)")
_FACILITY_NOUN = re.compile(
    r"(?i)(hospitals?|medical cent(?:er|re)|health cent(?:er|re)|clinic|infirmary|"
    r"nursing home|rehab\w*(?: center)?|hospice|urgent care|pharmacy|school|academy|"
    r"memorial|manor|health system|healthcare)\b.*$"
)


class Surrogates:
    def __init__(self, seed: int, key: str):
        digest = hashlib.sha256(f"{seed}\n{key}".encode()).digest()
        self.random = random.Random(digest)
        self.faker = Faker("en_US")
        self.faker.seed_instance(int.from_bytes(digest[:8], "big"))
        # at least a month either way, so no shifted date can be the real one
        self.shift = dt.timedelta(days=self.random.choice([d for d in range(-365, 366) if abs(d) >= 30]))
        self.tokens: dict[str, str] = {}
        self.values: dict[tuple[str, str], str] = {}

    def replace(self, category: str, value: str) -> str:
        key = (category, value.lower())
        if key not in self.values:
            make = getattr(self, f"_{category.lower()}", None)
            fake = make(value) if make else _shaped(self.random, value)
            self.values[key] = fake if fake.lower() != value.lower() else _shaped(self.random, value)
        return self.values[key]

    # ------------------------------------------------------------ people and places

    def _name(self, value: str) -> str:
        words = re.findall(r"[^\W\d_]+(?:['’-][^\W\d_]+)*\.?|\S", value)
        names = [w for w in words if len(w.rstrip(".")) > 1]
        out = []
        for word in words:
            if not re.match(r"[^\W\d_]", word):
                out.append(word)
                continue
            plain = word.rstrip(".").lower()
            if len(plain) == 1:  # an initial
                fake = self.tokens.setdefault(plain, self.random.choice("ABCDEFGHJKLMNPRSTW"))
                out.append(fake + ("." if word.endswith(".") else ""))
                continue
            is_last = len(names) > 1 and word == names[-1] or len(names) == 1 and not _is_first_name(plain)
            if plain not in self.tokens:
                fake = self.faker.last_name() if is_last else self.faker.first_name()
                while fake.lower() == plain:
                    fake = self.faker.last_name() if is_last else self.faker.first_name()
                self.tokens[plain] = fake
            out.append(_cased(self.tokens[plain], word))
        return _join_like(value, words, out)

    def _location(self, value: str) -> str:
        suffix = re.search(r"\s+(County|Parish|Borough)$", value)
        return _cased(self.faker.city(), value) + (suffix.group() if suffix else "")

    def _facility(self, value: str) -> str:
        noun = _FACILITY_NOUN.search(value)
        return _cased(f"{self.faker.last_name()} {noun.group(1) if noun else 'Medical Center'}", value)

    def _address(self, value: str) -> str:
        if re.match(r"(?i)p\.?\s?o\.?\s+box", value):
            return f"PO Box {self.random.randint(100, 9999)}"
        return _cased(self.faker.street_address(), value)

    def _email(self, value: str) -> str:
        return f"{self.faker.user_name()}@example.{self.random.choice(['com', 'org', 'net'])}"

    def _url(self, value: str) -> str:
        return f"https://www.{self.faker.domain_word()}.example.com/"

    def _ip(self, value: str) -> str:
        return self.faker.ipv6() if ":" in value else self.faker.ipv4_private()

    def _ssn(self, value: str) -> str:
        return "9" + _shaped(self.random, value)[1:]  # 9xx: never issued

    def _phone(self, value: str) -> str:
        # a North American number gets the 555-01xx range, which is reserved for fiction
        shaped = _shaped(self.random, value)
        digits = [i for i, c in enumerate(shaped) if c.isdigit()]
        if len(digits) >= 7:
            chars = list(shaped)
            for i, d in zip(digits[-7:], f"55501{self.random.randint(0, 99):02d}"):
                chars[i] = d
            shaped = "".join(chars)
        return shaped

    _fax = _phone

    def _age(self, value: str) -> str:
        return "90" if value.strip().isdigit() else "ninety"  # Safe Harbor's '90 or older'

    # ------------------------------------------------------------ dates: one shift per conversation

    def _date(self, value: str) -> str:
        weekday = _WEEKDAY.match(value)
        body = value[weekday.end() :] if weekday else value
        shifted = _shift_date(body.strip(), self.shift)
        if shifted is None:
            day = dt.date(2000, 1, 1) + dt.timedelta(days=self.random.randrange(366 * 20))
            shifted = f"{day.month}/{day.day}/{day.year}"
        elif weekday:  # the weekday is recomputed only where the year is known
            shifted = (
                weekday.group() + shifted
                if not re.search(r"\d{4}", shifted)
                else _weekday_like(weekday.group(), shifted) + shifted
            )
        return shifted


def _shift_date(value: str, shift: dt.timedelta) -> str | None:
    """The date moved by `shift`, written the way it came ('3/14' -> '5/2', 'March 14, 2023' -> 'May 2, 2023')."""
    m = re.fullmatch(r"(\d{1,2})([/.-])(\d{1,2})(?:\2(\d{2}|\d{4}))?", value)
    if m:
        month, day, year = int(m.group(1)), int(m.group(3)), m.group(4)
        if month > 12:  # day first
            month, day = day, month
        moved = _move(month, day, year, shift)
        if moved is None:
            return None
        text = f"{_pad(moved.month, m.group(1))}{m.group(2)}{_pad(moved.day, m.group(3))}"
        return text + (f"{m.group(2)}{_year(moved.year, year)}" if year else "")
    m = re.fullmatch(r"(\d{4})([/.-])(\d{1,2})\2(\d{1,2})", value)
    if m:
        moved = _move(int(m.group(3)), int(m.group(4)), m.group(1), shift)
        return (
            None
            if moved is None
            else f"{moved.year}{m.group(2)}{_pad(moved.month, m.group(3))}{m.group(2)}{_pad(moved.day, m.group(4))}"
        )
    m = re.fullmatch(r"(?i)([a-z]+)\.?\s+(\d{1,2})(st|nd|rd|th)?(,?\s+(\d{4}))?", value)
    if m and m.group(1).lower() in _MONTHS:
        moved = _move(_MONTHS[m.group(1).lower()], int(m.group(2)), m.group(5), shift)
        if moved is None:
            return None
        return f"{_month_like(moved.month, m.group(1))} {moved.day}{_ordinal(moved.day) if m.group(3) else ''}" + (
            f", {moved.year}" if m.group(5) else ""
        )
    m = re.fullmatch(r"(?i)(\d{1,2})(st|nd|rd|th)?(\s+of)?\s+([a-z]+)\.?,?(\s+(\d{4}))?", value)
    if m and m.group(4).lower() in _MONTHS:
        moved = _move(_MONTHS[m.group(4).lower()], int(m.group(1)), m.group(6), shift)
        if moved is None:
            return None
        return (
            f"{moved.day}{_ordinal(moved.day) if m.group(2) else ''}{m.group(3) or ''} "
            f"{_month_like(moved.month, m.group(4))}" + (f" {moved.year}" if m.group(6) else "")
        )
    m = re.fullmatch(r"(?i)([a-z]+)\.?,?\s+(?:of\s+)?(\d{4})", value)
    if m and m.group(1).lower() in _MONTHS:
        moved = _move(_MONTHS[m.group(1).lower()], 15, m.group(2), shift)
        return None if moved is None else f"{_month_like(moved.month, m.group(1))} {moved.year}"
    m = re.fullmatch(r"(\d{1,2})/(\d{4})", value)
    if m:
        moved = _move(int(m.group(1)), 15, m.group(2), shift)
        return None if moved is None else f"{_pad(moved.month, m.group(1))}/{moved.year}"
    return None


def _move(month: int, day: int, year: str | None, shift: dt.timedelta) -> dt.date | None:
    full = int(year) + (2000 if int(year) < 50 else 1900) if year and len(year) == 2 else int(year) if year else 2000
    try:
        return dt.date(full, month, day) + shift
    except ValueError:
        return None


def _pad(number: int, like: str) -> str:
    return f"{number:02d}" if len(like) == 2 else str(number)


def _year(year: int, like: str) -> str:
    return f"{year % 100:02d}" if len(like) == 2 else str(year)


def _ordinal(day: int) -> str:
    return "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def _month_like(month: int, like: str) -> str:
    name = (
        calendar.month_name[month] if len(like.rstrip(".")) > 3 or like.lower() == "may" else calendar.month_abbr[month]
    )
    return _cased(name, like)


def _weekday_like(like: str, date_text: str) -> str:
    try:
        day = dt.datetime.strptime(re.sub(r"(st|nd|rd|th)\b", "", date_text).replace(",", ""), "%B %d %Y")
    except ValueError:
        return like
    name = calendar.day_name[day.weekday()]
    word = re.match(r"[A-Za-z]+", like).group()
    rest = like[len(word) :]
    return _cased(name if len(word) > 3 else name[:3], word) + rest


# ------------------------------------------------------------ helpers


def _is_first_name(word: str) -> bool:
    from medlora.safety.phi_ner import name_lexicon

    first, last = name_lexicon()
    return word in first and word not in last


def _cased(fake: str, like: str) -> str:
    letters = [c for c in like if c.isalpha()]
    if letters and all(c.isupper() for c in letters) and len(letters) > 1:
        return fake.upper()
    if letters and all(c.islower() for c in letters):
        return fake.lower()
    return fake


def _join_like(value: str, words: list[str], fakes: list[str]) -> str:
    """Put each fake word where its original was, keeping the spacing and punctuation between them."""
    out, position = [], 0
    for word, fake in zip(words, fakes):
        index = value.index(word, position)
        out += [value[position:index], fake]
        position = index + len(word)
    out.append(value[position:])
    return "".join(out)


def _shaped(rng: random.Random, value: str) -> str:
    """The same shape with other characters: digits for digits, letters for letters, separators kept."""
    out = []
    for i, c in enumerate(value):
        if c.isdigit():
            out.append(str(rng.randint(1 if i == 0 else 0, 9)))
        elif c.isupper():
            out.append(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ"))
        elif c.islower():
            out.append(rng.choice("abcdefghjkmnpqrstuvwxyz"))
        else:
            out.append(c)
    return "".join(out)
