"""PHI/PII redaction: HIPAA Safe Harbor identifiers in text -> typed placeholders such as `[NAME]`, `[DATE]`.

Two detection layers, merged:
- presidio-analyzer's predefined pattern recognizers, called directly with no NLP engine (nothing is
  downloaded): email, phone (Google's libphonenumber), US SSN, IPv4/IPv6, URL, credit card, IBAN, MAC;
- hand-written rules for what those cannot find without a NER model: names in context, street addresses,
  ZIP codes, dates, ages over 89, and record / plan / account / licence / vehicle / device numbers
  introduced by their keyword.
Overlapping detections keep the longest span, then the most specific rule. No raw text is ever logged.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from medlora.config import MedloraError

CATEGORIES = ("NAME", "ADDRESS", "ZIP", "DATE", "AGE", "PHONE", "FAX", "EMAIL", "SSN", "MRN", "HEALTH_PLAN",
              "ACCOUNT", "LICENSE", "VEHICLE", "DEVICE", "URL", "IP")

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
_NAME = rf"(?:{_WORD}|(?:[{_UP}]\.){{1,3}})(?:\s+{_MIDDLE}?(?:{_PARTICLE}\s+){{0,2}}{_WORD}){{0,2}}"  # J. Smith, M.M. Cohen
_FULL_NAME = rf"{_WORD}\s+{_MIDDLE}?(?:{_PARTICLE}\s+){{0,2}}{_WORD}"  # first and last: Maria de la Cruz
_CAPS_NAME = rf"[{_UP}]{{2,}}(?:\s+[{_UP}]\.?)?(?:\s+[{_UP}]{{2,}}(?:-[{_UP}]{{2,}})?){{1,2}}"  # JOHN A SMITH
_LAST_FIRST = rf"{_WORD},\s+{_WORD}(?:\s+[{_UP}]\.?)?"  # Smith, John A.
# 'What Your Doctor Needs to Know': after a determiner, Doctor is a noun in a title-case heading
_TITLE = (r"(?:(?:Dr|Mr|Mrs|Ms|Mx|Prof)\.?|(?<!Your )(?<!your )(?<!My )(?<!my )(?<!The )(?<!the )(?<!A )(?<!a )"
          r"(?:Doctor|Professor|Nurse|Miss))")

# Capitalised words that follow name cues but are not names: headings, pronouns, months, days, common brands.
_NOT_NAMES = frozenset("""
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
""".split())


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


_LOWER_NAME_STOP = frozenset("""
and but so i im i'm am is was not just from here with a an the of in on at to for my me very really also
currently having have had been age aged years old year male female mom dad mother father writing asking
""".split())


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
    role_label = (r"(?i:\b(?:guardian|emergency\s+contact|next\s+of\s+kin|nok|referring\s+(?:physician|provider|doctor)|"
                  r"attending(?:\s+physician)?|pcp|primary\s+care\s+(?:physician|provider|doctor)|provider|physician|"
                  r"surgeon|nurse|caregiver|(?:electronically\s+)?signed(?:\s+by)?|seen\s+by|examined\s+by|dictated\s+by|"
                  r"cc|contact(?:\s+person)?|spouse|mother|father|parent|informant)\b)")
    two_words = rf"{_FULL_NAME}(?:\s+{_WORD})?"
    # the relation noun is lowercase: 'What Your Doctor Needs to Know' is a title-case heading, not a name
    kin = (r"(?i:\b(?:my|his|her|their|our|your|the\s+patient's|patient's))\s+(?:wife|husband|spouse|son|daughter|"
           r"mother|father|mom|mum|dad|brother|sister|partner|boyfriend|girlfriend|fianc[ée]e?|friend|roommate|"
           r"grandson|granddaughter|grandmother|grandfather|grandma|grandpa|aunt|uncle|nephew|niece|cousin|child|"
           r"baby|toddler|kid|stepson|stepdaughter|caregiver|neighbou?r|boss|coworker|colleague|doctor|physician|"
           r"nurse|therapist|dentist|surgeon|pharmacist|cardiologist|oncologist|GP|pediatrician|paediatrician|"
           r"psychiatrist|counselor|midwife)")
    verbs = (r"(?:was|is|has|had|have|presented|presents|reported|reports|complained|complains|denies|denied|"
             r"states|stated|said|says|arrived|came|returned|underwent|received|will|who|developed|remains|"
             r"continues|tolerated|agreed|declined|'s)\b")
    credentials = (r"(?:MD|M\.D\.|DO|D\.O\.|RN|NP|PA-C|PhD|Ph\.D\.|DDS|DMD|PharmD|FNP(?:-BC)?|APRN|LPN|CNM|DPM|"
                   r"MBBS|LCSW|CRNA|MSN|BSN)")
    return [
        _rule(rf"\b{_TITLE}\s+(?P<name>(?:{_PARTICLE}\s+){{0,2}}{_NAME})", CONTEXTUAL, _name_check),  # Dr. de la Cruz
        _rule(rf"{name_label}\s*:\s*(?:{_TITLE}\s+)?(?P<name>{_LAST_FIRST}|{_NAME}|{_CAPS_NAME})", CONTEXTUAL,
              _name_check),
        _rule(rf"{role_label}\s*:\s*(?:{_TITLE}\s+)?(?P<name>{_LAST_FIRST}|{two_words}|{_CAPS_NAME})", CONTEXTUAL,
              _name_check),
        _rule(rf"\b(?:patient|pt\.?|Pt\.?|client|resident),?\s+(?P<name>{_NAME})", CONTEXTUAL, _name_check),
        _rule(rf"(?i:\b(?:hi|hello|hey|good\s+(?:morning|afternoon|evening))[,!.]?\s+(?:i'm|i\s+am|this\s+is|it's)\s+)"
              rf"(?:{_TITLE}\s+)?(?P<name>{_NAME})", CONTEXTUAL, _name_check),
        _rule(rf"\bPatient\s+(?P<name>{_NAME})(?=\s*,|\s+{verbs})", CONTEXTUAL, _name_check),
        _rule(rf"(?i:\b(?:my\s+name\s+is|my\s+name's|name\s+is|i\s+am\s+called|they\s+call\s+me)\s+)"
              rf"(?P<name>{_NAME})", CONTEXTUAL, _name_check),
        _rule(r"(?i:\bmy\s+name\s+is\s+)(?P<name>[^\W\d_]+(?:\s+[^\W\d_]+){0,3})", CONTEXTUAL - 1, _lower_name_check),
        _rule(rf"{kin}\s*,?\s+(?P<name>{_NAME})", CONTEXTUAL, _name_check),
        _rule(rf"(?i:\b(?:seen|examined|evaluated|treated|referred|signed|dictated|accompanied|visited)\s+by\s+)"
              rf"(?P<name>{_FULL_NAME})", CONTEXTUAL, _name_check),
        _rule(rf"\b(?P<name>{_FULL_NAME}),?\s+{credentials}(?![\w-])", CONTEXTUAL, _name_check),
        # a full name as the subject of a clinical event: 'Maria Lopez was admitted', 'John A. Reyes presented'
        _rule(rf"\b(?P<name>{_FULL_NAME})\s+(?:(?:was|is)\s+(?:a\s+\d+[- ]year[- ]old|admitted|"
              rf"seen|discharged|transferred|referred|evaluated|brought|readmitted)|presented|presents|complains|"
              rf"complained|denies|denied|underwent)\b", CONTEXTUAL, _name_check),
        _rule(rf"(?:^|(?<=[\s(]))(?:Dear|Hi|Hello|Hey|Thanks|Sincerely|Regards|Cheers),?\s+(?P<name>{_NAME})"
              rf"(?=\s*[,!\n:.]|$)", CONTEXTUAL, _name_check),
    ]


_MONTH = (r"(?:(?i:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
          r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)|May|MAY)")
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
    sep_num = r"(?P<date>(?:0?[1-9]|1[0-2])([/.-])(?:0?[1-9]|[12]\d|3[01])\2(?:" + _YEAR + r"|\d{2}))(?![\d/.-]\d)"
    sep_dmy = r"(?P<date>(?:0?[1-9]|[12]\d|3[01])([/.-])(?:0?[1-9]|1[0-2])\2(?:" + _YEAR + r"|\d{2}))(?![\d/.-]\d)"
    units = (r"(?:tabs?|tablets?|pills?|caps?|capsules?|cups?|doses?|strength|teaspoons?|tsp|of|mg|ml|days?|weeks?|"
             r"hours?|times|inch(?:es)?|normal|saline)\b")
    return [
        _rule(rf"\b(?P<date>{_WEEKDAY}?{_MONTH}\.?\s+{_DAY}(?:,?\s+{_YEAR})?)\b", PATTERN, _date_check),
        _rule(rf"\b(?P<date>{_WEEKDAY}?(?:the\s+)?{_DAY}(?:\s+of)?\s+{_MONTH}\.?(?:,?\s+{_YEAR})?)\b", PATTERN,
              _date_check),
        _rule(rf"\b(?P<date>{_MONTH}\.?,?\s+(?:of\s+)?{_YEAR})\b", PATTERN, _date_check),
        _rule(rf"\b(?P<date>{_DAY}[-/ ]{_MONTH}[-/ ](?:{_YEAR}|\d\d))\b", PATTERN),
        _rule(rf"(?<![\d/.-])\b{sep_num}", PATTERN, _numeric_date_check),
        _rule(rf"(?<![\d/.-])\b{sep_dmy}", PATTERN, _numeric_date_check),
        _rule(rf"(?<![\d/.-])\b(?P<date>{_YEAR}([/.-])(?:0?[1-9]|1[0-2])\2(?:0?[1-9]|[12]\d|3[01]))\b(?![/.-]\d)",
              PATTERN),
        _rule(rf"(?<![\d/.-])\b(?P<date>(?:0[1-9]|1[0-2])/{_YEAR})\b(?![/.-]\d)", PATTERN),
        _rule(r"(?i:\b(?:on|since|from|until|till|dated|dob|born|admitted|discharged|seen|returned)\s+)"
              rf"(?P<date>(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01]))\b(?![/.]\d)(?!\s*{units})", CONTEXTUAL),
        _rule(r"(?i:\b(?:dob|d\.o\.b\.|date\s+of\s+birth|birth\s*date|birthday|date)\s*[:#]?\s*)"
              r"(?P<date>(?:19|20)\d{6}|\d{8})\b", KEYED),
    ]


_AGE = r"(?:9\d|1[0-2]\d)"  # 90-129: Safe Harbor keeps ages up to 89
_AGE_WORDS = (r"(?i:ninety(?:[- ](?:one|two|three|four|five|six|seven|eight|nine))?|"
              r"one\s+hundred(?:\s+and)?(?:[- ](?:one|two|three|four|five|six|seven|eight|nine|ten))?)")
# a threshold ('up to age 90', 'over 90 years old', 'aged 90 and older') describes a population, not a person
_AGE_THRESHOLD_BEFORE = re.compile(r"(?i)\b(?:up\s+to|until|till|through|by|before|after|over|under|above|below|"
                                   r"beyond|past|than|least|reach(?:es|ing)?|reached|live\s+to)\s+(?:the\s+)?"
                                   r"(?:age\s+(?:of\s+)?)?$")
_AGE_THRESHOLD_AFTER = re.compile(r"(?i)^(?:[- ]?years?(?:[- ]old)?)?\s*(?:\+|plus\b|and\s+(?:older|over|above|up)|"
                                  r"or\s+(?:older|more|over|above))")


def _age_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    text = match.string
    if _AGE_THRESHOLD_BEFORE.search(text[max(0, match.start() - 20): match.start()]):
        return None
    if _AGE_THRESHOLD_AFTER.match(text[match.end(group): match.end(group) + 20]):
        return None
    return match.span(group)


def _age_rules() -> list[_Rule]:
    years_old = r"(?:[- ]?(?:years?|yrs?|y)[- ]?(?:old|o\.?)\b|\s*(?:yo|y/o|y\.o\.?)(?!\w))"
    return [
        _rule(rf"\b(?P<age>{_AGE}){years_old}", PATTERN, _age_check),
        _rule(rf"\b(?P<age>{_AGE_WORDS}){years_old}", PATTERN, _age_check),
        _rule(rf"(?i:\b(?:age[ds]?|aged|age\s+of)\s*[:=]?\s*)(?P<age>{_AGE})\b(?!\s*(?:%|percent|mg|kg|lbs?|cm|mm)\b)",
              PATTERN, _age_check),
        _rule(rf"(?i:\b(?:age[ds]?|aged)\s+)(?P<age>{_AGE_WORDS})\b", PATTERN, _age_check),
        _rule(rf"\b(?P<age>{_AGE})\s+(?:years?|yrs?)\s+of\s+age\b", PATTERN, _age_check),
        _rule(rf"(?i:\bturn(?:s|ed|ing)?\s+)(?P<age>{_AGE})\b(?!\s*(?:%|percent|mg|minutes|degrees))", PATTERN,
              _age_check),
    ]


_STATE_ABBR = (r"(?:AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|"
               r"NM|NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR|GU|VI)")
_STATE_NAME = (r"(?:Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|Hawaii|"
               r"Idaho|Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|"
               r"Minnesota|Mississippi|Missouri|Montana|Nebraska|Nevada|New\s+Hampshire|New\s+Jersey|New\s+Mexico|"
               r"New\s+York|North\s+Carolina|North\s+Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|Rhode\s+Island|"
               r"South\s+Carolina|South\s+Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington|West\s+Virginia|"
               r"Wisconsin|Wyoming|Puerto\s+Rico)")
_STATE = rf"(?:{_STATE_ABBR}|{_STATE_NAME})"
# 'ID 94583' is an identifier, 'OR 12345' a word: without a city before them these abbreviations prove nothing
_UNAMBIGUOUS_STATE = rf"(?:(?!(?:ID|IN|OR|ME|OK|HI|DE|LA|MS|MD|PA|MA|CO|GA|AL)\b){_STATE_ABBR}|{_STATE_NAME})"
_ZIP = r"\d{5}(?:-\d{4})?"
_UK_POSTCODE = r"[A-Z]{1,2}\d[A-Z\d]?\s?\d[ABD-HJLNP-UW-Z]{2}"
_UK_POSTCODE_SPACED = r"[A-Z]{1,2}\d[A-Z\d]?\s\d[ABD-HJLNP-UW-Z]{2}"  # unspaced and unlabelled it reads as a gene: IL36RN
_STREET_SUFFIX = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|"
                  r"Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Alley|Row|Loop|Crescent|Close|Pike|"
                  r"Plaza|Path|Walk|Gardens|Heights|Mews|Crossing|Creek|Cove|Glen|Grove|Harbor|Haven|Hollow|Junction|"
                  r"Knoll|Landing|Manor|Meadows?|Mission|Orchard|Pass|Pines|Ridge|Route|Rte|Run|Shores?|Springs|"
                  r"Summit|Trace|Turnpike|Tpke|Valley|Vista|Expressway|Expy|Freeway|Fwy|Estates|Hills|Village|"
                  r"Causeway|Bypass|Extension|Ext|Broadway)")
_DIRECTION = r"(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\.?"
_PLACE = rf"(?:St\.\s+)?[{_UP}][{_LO}'-]+(?:\s+[{_UP}][{_LO}'-]+){{0,2}}"
_UNIT = r"(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|Room|Rm|Floor|Fl|Bldg|Building|#)\.?\s*#?\s*[A-Za-z0-9-]{1,6}\b)"
_NOT_PLACES = frozenset("the a an africa asia europe america americas antarctica australia oceania "
                        "united us usa uk canada".split())


def _place_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    words = match.group(group).split()
    return None if not words or _plain(words[0]) in _NOT_PLACES else match.span(group)


def _address_rules() -> list[_Rule]:
    street = (rf"\d{{1,6}}[A-Za-z]?(?:-\d{{1,4}})?\s+(?:{_DIRECTION}\s+)?"
              rf"(?:(?:[{_UP}][{_LO}A-Z'.-]*|\d{{1,3}}(?:st|nd|rd|th))\s+){{1,4}}{_STREET_SUFFIX}\b\.?"
              rf"(?:\s+{_DIRECTION}(?!\w))?{_UNIT}?")
    city_state = rf"(?:,\s*{_PLACE})?(?:,?\s+{_STATE}\b\.?)?"
    return [
        _rule(rf"\b(?P<address>{street}{city_state})(?:,?\s+(?P<zip>{_ZIP})\b)?", PATTERN),
        _rule(rf"(?i:\b(?P<address>p\.?\s?o\.?\s+box\s+\d{{1,6}}))\b", KEYED),
        # US military mail: 'PSC 1234, Box 5678, APO AA 34001'
        _rule(r"\b(?P<address>(?:PSC|CMR|Unit)\s+\d{3,5},?\s+Box\s+\d{1,5}(?:,?\s+(?:APO|FPO|DPO)\s+A[AEP])?)"
              r"(?:,?\s+(?P<zip>\d{5}(?:-\d{4})?)\b)?", KEYED),
        _rule(r"\b(?:APO|FPO|DPO)\s+A[AEP]\s+(?P<zip>\d{5}(?:-\d{4})?)\b", KEYED),
        _rule(rf"\b(?P<address>{_PLACE},\s*{_STATE}\b\.?),?\s+(?P<zip>{_ZIP})\b", PATTERN),
        # one person's home ('she lives in Dayton'), not a population ('Jews living in Israel', 'Living With ...')
        _rule(rf"(?i:\b(?:i|he|she|patient|pt|who|currently|now|and)\s+(?:am\s+|is\s+)?(?:live|lives|living|reside|"
              rf"resides|residing|moved|relocated)\s+(?:in|at|to|from)\s+|\bmy\s+address\s+is\s+|\bhome\s+in\s+)"
              rf"(?P<address>{_PLACE}(?:,\s*{_STATE}\b)?)", CONTEXTUAL, _place_check),
        _rule(rf"\b(?P<address>{_PLACE}\s+(?:County|Parish|Borough))\b", CONTEXTUAL, _place_check),
        _rule(rf"\b{_UNAMBIGUOUS_STATE}\.?,?\s+(?P<zip>{_ZIP})\b", PATTERN),
        _rule(rf"(?i:\b(?:zip|zip\s*code|postal\s*code|post\s*code|postcode)\s*(?:is|:|#|=)?\s*)"
              rf"(?P<zip>{_ZIP}|{_UK_POSTCODE})\b", KEYED),
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
        _keyed("SSN", r"ssn|ss\s*#|ss\s+number|social\s+security(?:\s+(?:number|no\.?|#|card))?|social\s*#",
               value=r"\d{3}[- .]?\d{2}[- .]?\d{4}|(?i:x{3}|\*{3})[- ]?(?i:x{2}|\*{2})[- ]?\d{4}"),
        _keyed("MRN", rf"mrn|mr\s*#|medical\s+record(?:{_NUM})?|med(?:ical)?\s+rec\.?\s*#|record{_NUM}|chart{_NUM}|"
                      rf"patient{_NUM}|patient\s+identifier|hospital{_NUM}|case{_NUM}|encounter{_NUM}|"
                      rf"accession{_NUM}|visit{_NUM}|admission{_NUM}|nhs{_NUM}|uhid|emr{_NUM}|ehr{_NUM}|"
                      rf"prescription{_NUM}|rx\s*(?:#|number|no\.?)"),  # a pharmacy's record number
        _keyed("HEALTH_PLAN", rf"member{_NUM}|health\s*plan(?:\s+beneficiary)?{_NUM}|(?:health\s+)?insurance{_NUM}|"
                              rf"insurance\s+policy{_NUM}|insurance\s+card{_NUM}|policy{_NUM}|subscriber{_NUM}|"
                              rf"group{_NUM}|medicare(?:\s+beneficiary)?(?:{_NUM}|\s+identifier|\s+card\s+number)|"
                              rf"medicaid{_NUM}|mbi|hicn|beneficiary{_NUM}|plan{_NUM}|claim{_NUM}"),
        _keyed("ACCOUNT", rf"account{_NUM}|acct\.?(?:{_NUM})?|a/c(?:{_NUM})?|billing(?:{_NUM}|\s+account)|"
                          rf"bank\s+account|credit\s+card(?:{_NUM})?|debit\s+card(?:{_NUM})?|card{_NUM}|"
                          rf"(?:card|account)\s+ending\s+in|invoice{_NUM}|routing{_NUM}|patient\s+account|"
                          rf"financial\s+account"),
        _keyed("LICENSE", rf"driver'?s?\s+licen[sc]e(?:{_NUM})?|driving\s+licen[sc]e(?:{_NUM})?|"
                          rf"(?:medical|nursing|professional|state|pharmacy|board|practice)\s+licen[sc]e(?:{_NUM})?|"
                          rf"licen[sc]e{_NUM}|dea(?:{_NUM}|\s+registration)?|npi(?:{_NUM})?|"
                          rf"certificat(?:e|ion){_NUM}|passport(?:{_NUM})?|state\s+id(?:{_NUM})?|id\s+card{_NUM}",
               case_sensitive=r"(?<![/\w])DL\s*(?:#|:|No\.?|number)"),
        _keyed("VEHICLE", rf"vin|vehicle\s+identification(?:{_NUM})?|licen[sc]e\s+plate(?:{_NUM})?|plate{_NUM}|"
                          rf"number\s+plate|(?:vehicle|car)\s+registration(?:{_NUM})?|tag{_NUM}|vehicle{_NUM}|plate",
               value=rf"[A-Z]{{2}}\d{{2}}\s[A-Z]{{3}}|(?:{_STATE_ABBR}\s)?{_ID_VALUE}"),  # UK AB12 CDE, 'NY GHJ-4821'
        _keyed("DEVICE", rf"serial(?:{_NUM})?|s/n|sn(?=\s*[:#])|device(?:{_NUM}|\s+serial|\s+identifier)|udi|imei|"
                         r"(?:pacemaker|defibrillator|icd|implant|pump|cgm|monitor|hearing\s+aid|stimulator|"
                         r"glucometer|meter|transmitter|sensor|receiver|reader|inhaler|ventilator|cpap|bipap)"
                         r"\s*(?:serial|id|identifier|sn)(?:\s*(?:number|no\.?|#))?|"
                         r"model\s*/\s*serial"),
        _rule(r"(?i:\budi\s*[:#]?\s*)(?P<device>(?:\(\d{2,4}\)[A-Za-z0-9]+){2,})", KEYED),
    ]


_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)
_VIN_VALUES = {**{str(d): d for d in range(10)}, **dict(zip("ABCDEFGH", range(1, 9))),
               **dict(zip("JKLMN", range(1, 6))), "P": 7, "R": 9, **dict(zip("STUVWXYZ", range(2, 10)))}


def vin_check_digit(vin: str) -> str:
    """The North American VIN check digit (position 9), which makes a bare 17-character token safe to flag."""
    total = sum(_VIN_VALUES[c] * w for c, w in zip(vin.upper(), _VIN_WEIGHTS))
    return "X" if total % 11 == 10 else str(total % 11)


def _vin_check(category: str, match: re.Match, group: str) -> tuple[int, int] | None:
    vin = match.group(group)
    return match.span(group) if vin[8] == vin_check_digit(vin) else None


def _contact_rules() -> list[_Rule]:
    nanp = (r"(?<![\w+/.-])(?P<phone>(?:\+?1[\s.-]?|001[\s.-])?(?:\(\d{3}\)\s?|\d{3}[\s.-]?)\d{3}[\s.-]\d{4}"
            r"(?:\s*(?:ext\.?|x|extension)\s*\d{1,6})?)(?![\w/-]|\.\d)")
    international = (r"(?<![\w+])(?P<phone>\+\d{1,3}(?:[\s.-]?\(?\d{1,5}\)?){2,6}"
                     r"(?:\s*(?:ext\.?|x|extension)\s*\d{1,6})?)(?![\w/-]|\.\d)")
    return [
        _rule(nanp, PATTERN),
        _rule(international, PATTERN, _international_check),
        _rule(r"(?i:\b(?:phone|tel|telephone|cell|mobile|call|text|fax|contact|reach)\b\D{0,12}?)"
              r"(?P<phone>\d{10,11})\b", PATTERN),
        _rule(r"(?P<url>(?i:\b(?:https?|ftp)://)[^\s<>\"'()]+)", PATTERN),  # any host: IPs, ports, intranet names
        _rule(r"\b(?P<vehicle>[A-HJ-NPR-Z0-9]{17})\b", VALIDATED, _vin_check),
        _rule(r"(?i:\bimei\b\D{0,12})(?P<device>\d{15})\b", KEYED),
    ]


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

_PRESIDIO_CATEGORY = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "US_SSN": "SSN", "IP_ADDRESS": "IP",
                      "URL": "URL", "CREDIT_CARD": "ACCOUNT", "IBAN_CODE": "ACCOUNT", "MAC_ADDRESS": "DEVICE"}
_MIN_SCORE = 0.3  # presidio's 'very weak' patterns (score 0.05: any 9 digits as an SSN) are context-only hints
_TRAILING = ".,;:!?)]}'\""


@functools.lru_cache(maxsize=1)
def _presidio_recognizers() -> tuple:
    """Built once: importing presidio takes seconds (it imports its NLP engines), so only when first needed."""
    try:
        import tldextract
        from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, EmailRecognizer, IbanRecognizer,
                                                              IpRecognizer, MacAddressRecognizer, PhoneRecognizer,
                                                              UrlRecognizer, UsSsnRecognizer)
    except ImportError as err:
        raise MedloraError(f"PHI redaction needs presidio-analyzer, which cannot be imported ({err}). Install it: "
                           "`.venv/bin/pip install presidio-analyzer==2.2.366`.") from err

    # the default extractor fetches the public-suffix list over the network; the bundled snapshot is enough
    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text).fqdn != ""

    return (OfflineEmailRecognizer(), PhoneRecognizer(), UsSsnRecognizer(), IpRecognizer(), UrlRecognizer(),
            CreditCardRecognizer(), IbanRecognizer(), MacAddressRecognizer())


def _presidio_spans(text: str) -> Iterator[Span]:
    for recognizer in _presidio_recognizers():
        for result in recognizer.analyze(text, recognizer.supported_entities, nlp_artifacts=None):
            if result.score < _MIN_SCORE:
                continue
            category = _PRESIDIO_CATEGORY[result.entity_type]
            # libphonenumber also reads dotted dates and IPv4 addresses as numbers: those rules win ties
            specificity = LOOSE if category == "PHONE" else VALIDATED if result.score >= 0.6 else PATTERN
            yield Span(result.start, result.end, category, specificity)


# ---------------------------------------------------------------- post-processing of candidate spans

_BARE_DOMAIN_TLDS = frozenset("com org net edu gov mil int info biz io co us uk ca au health care clinic hospital "
                              "app dev me ly tv".split())


def _url_fix(text: str, span: Span) -> Span | None:
    """Drop trailing punctuation; reject 'felt.Lu'-style sentence joins, which are not bare domains."""
    end = span.end
    while end > span.start and text[end - 1] in _TRAILING:
        end -= 1
    value = text[span.start:end]
    if not re.match(r"(?i)(?:https?|ftp)://|www\d{0,3}\.", value):
        host = value.split("/")[0]
        tld = host.rsplit(".", 1)[-1]
        if tld not in _BARE_DOMAIN_TLDS or "@" in text[max(0, span.start - 1): span.start]:
            return None
    elif re.match(r"(?i)www\d{0,3}\.[^./]+$", value.split("/")[0]):
        return None  # 'www.nc' of a broken 'www.nccam. nih.gov': no site is named www.<tld>
    return Span(span.start, end, span.category, span.specificity)


def _is_public_url(text: str, span: Span, suffixes: tuple[str, ...]) -> bool:
    host = re.sub(r"(?i)^(?:https?|ftp)://", "", text[span.start:span.end]).split("/")[0].split(":")[0].lower()
    return any(host.endswith(suffix) or host == suffix.lstrip(".") for suffix in suffixes)


_PHONE_CUE = re.compile(r"(?i)\b(fax(?:ed|ing)?|facsimile|phone|tel|telephone|cell|mobile|call(?:ed)?|text|ph)\b"
                        r"|(?<![\w.])(F)(?=\s*[:#])")  # 'T: ... F: ...' letterheads


def _phone_category(text: str, span: Span) -> str:
    """A number is a fax when the nearest phone word before it says so ('Tel ..., Fax ...'), or '(fax)' follows."""
    before = [m.group() for m in _PHONE_CUE.finditer(text[max(0, span.start - 30): span.start])]
    if before and before[-1].lower().startswith(("fax", "facsimile", "f")):
        return "FAX"
    if re.match(r"(?i)\s*\((?:fax|facsimile)\)", text[span.end: span.end + 14]):
        return "FAX"
    return "PHONE"


def _is_toll_free(text: str, span: Span) -> bool:
    digits = re.sub(r"\D", "", re.split(r"(?i)ext|x", text[span.start:span.end])[0])
    digits = digits[1:] if len(digits) == 11 and digits.startswith("1") else digits
    return len(digits) == 10 and digits[:3] in TOLL_FREE_PREFIXES


def _merge_same_category(spans: Iterable[Span]) -> list[Span]:
    """Overlapping spans of one category are parts of one identifier ('1119 Old Humboldt Road' and 'Humboldt
    Road Jackson, TN'): their union is redacted whole."""
    merged: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.category, s.keep, s.start)):
        last = merged[-1] if merged else None
        if last and (last.category, last.keep) == (span.category, span.keep) and span.start < last.end:
            merged[-1] = Span(last.start, max(last.end, span.end), last.category,
                              max(last.specificity, span.specificity), last.keep)
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
    """Replace PHI in text with `[CATEGORY]` placeholders.

    categories: the categories to redact (None = all of CATEGORIES); the others are still detected, so that an
        MRN is never half-redacted as a phone number, but left in the text.
    keep_toll_free: keep US toll-free numbers (800, 888, ...): public help lines, not a person's number.
    public_url_suffixes: keep URLs whose host ends with one of these (government, intergovernmental sites).
    """

    def __init__(self, categories: Iterable[str] | None = None, keep_toll_free: bool = True,
                 public_url_suffixes: Iterable[str] = PUBLIC_URL_SUFFIXES):
        chosen = CATEGORIES if categories is None else tuple(c.upper().strip("[]") for c in categories)
        unknown = sorted(set(chosen) - set(CATEGORIES))
        if unknown:
            raise MedloraError(f"unknown PHI categories {unknown}: use any of {', '.join(CATEGORIES)} "
                               "(or leave categories unset for all).")
        self.categories = frozenset(chosen)
        self.keep_toll_free = bool(keep_toll_free)
        self.public_url_suffixes = tuple(s.lower() for s in public_url_suffixes)
        _presidio_recognizers()  # fail here, not mid-dataset, if presidio is broken

    @classmethod
    def from_config(cls, config: Mapping | None) -> PhiRedactor:
        """Build from a config mapping (a Hydra node or dict) with the constructor's keys."""
        config = dict(config or {})
        allowed = {"categories", "keep_toll_free", "public_url_suffixes"}
        if set(config) - allowed:
            raise MedloraError(f"unknown PHI redactor settings {sorted(set(config) - allowed)}: "
                               f"use {', '.join(sorted(allowed))}.")
        return cls(**config)

    def detect(self, text: str) -> list[Span]:
        """Non-overlapping detections, public identifiers included (marked keep=True)."""
        candidates = []
        for span in (*_presidio_spans(text), *_hand_spans(text)):
            span = self._refine(text, span)
            if span is not None:
                candidates.append(span)
        return _resolve(candidates)

    def _refine(self, text: str, span: Span) -> Span | None:
        if span.category == "URL":
            span = _url_fix(text, span)
            if span and _is_public_url(text, span, self.public_url_suffixes):
                return Span(span.start, span.end, span.category, span.specificity, keep=True)
        elif span.category == "PHONE":
            keep = self.keep_toll_free and _is_toll_free(text, span)
            return Span(span.start, span.end, _phone_category(text, span), span.specificity, keep)
        return span

    def redact(self, text: str) -> tuple[str, Counter]:
        """The text with each PHI span replaced by `[CATEGORY]`, and the number of placeholders per category."""
        return self.apply(text, self.detect(text))

    def apply(self, text: str, spans: Iterable[Span]) -> tuple[str, Counter]:
        """Replace the given detections (from `detect`) that this redactor's categories cover."""
        counts: Counter = Counter()
        pieces, position = [], 0
        for span in spans:
            if span.keep or span.category not in self.categories:
                continue
            pieces += [text[position:span.start], f"[{span.category}]"]
            position = span.end
            counts[span.category] += 1
        pieces.append(text[position:])
        return "".join(pieces), counts

    def redact_messages(self, messages: list[dict]) -> tuple[list[dict], Counter]:
        """Redact the `content` of each chat message; other keys are copied."""
        counts: Counter = Counter()
        redacted = []
        for message in messages:
            content, found = self.redact(message["content"])
            counts.update(found)
            redacted.append({**message, "content": content})
        return redacted, counts
