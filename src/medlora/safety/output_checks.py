"""Checks on generated text before it reaches the user, by rules alone (no model).

Four kinds of violation, each judged sentence by sentence:
- dangerous dosing: an amount of a common over-the-counter medicine above its adult single or daily
  maximum, or open-ended advice ("take as many as you need", "double the dose");
- definitive diagnosis: "you have cancer", "this is definitely appendicitis";
- prescribing a controlled substance without a prescriber ("try some Xanax", "borrow a friend's oxycodone");
- telling the person to stop prescribed treatment ("stop taking your insulin").
A warning that mentions the same words ("do not take more than 4,000 mg", "don't stop your insulin")
is not a violation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from medlora.safety.settings import medical_defaults
from medlora.safety.text import negated, normalise, sentence_spans
from medlora.safety.triage import CONTROLLED, DRUG_SUFFIX

ON_VIOLATION = ("block", "rewrite", "refer")


class OutputCheckConfigError(ValueError):
    """A bad output-check setting: the message names the key and the fix."""


@dataclass
class OutputDecision:
    action: str  # "pass" | "block" | "rewrite" | "refer"
    categories: list[str]
    rule_ids: list[str]
    text: str


# ---------------------------------------------------------------------------------------------
# dosing


@dataclass(frozen=True)
class _Limit:
    names: tuple[str, ...]
    single_mg: float  # largest single adult dose on common labelling
    daily_mg: float  # adult maximum in 24 hours


# Adult maxima from common (US) labelling; prescription ceilings where they are higher than the
# over-the-counter label (ibuprofen 3.2 g, naproxen 1.5 g, loperamide 16 mg), so only clearly unsafe
# amounts are flagged.
LIMITS = {
    "acetaminophen": _Limit(("acetaminophen", "paracetamol", "tylenol", "panadol", "apap"), 1000, 4000),
    "ibuprofen": _Limit(("ibuprofen", "advil", "motrin", "nurofen"), 800, 3200),
    "naproxen": _Limit(("naproxen", "aleve", "naprosyn"), 550, 1500),
    "aspirin": _Limit(("aspirin", "acetylsalicylic acid"), 1000, 4000),
    "diphenhydramine": _Limit(("diphenhydramine", "benadryl"), 50, 300),
    "loratadine": _Limit(("loratadine", "claritin"), 10, 10),
    "cetirizine": _Limit(("cetirizine", "zyrtec"), 10, 10),
    "loperamide": _Limit(("loperamide", "imodium"), 4, 16),
    "dextromethorphan": _Limit(("dextromethorphan", "dxm"), 60, 120),
}
_DRUG = re.compile(r"\b(?:" + "|".join(n for lim in LIMITS.values() for n in lim.names) + r")\b")
_UNIT_MG = {
    "mg": 1.0,
    "milligram": 1.0,
    "milligrams": 1.0,
    "g": 1000.0,
    "gm": 1000.0,
    "gram": 1000.0,
    "grams": 1000.0,
    "mcg": 0.001,
    "microgram": 0.001,
    "micrograms": 0.001,
}
_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
# a range ("500-1000 mg") counts at its upper end
_AMOUNT = re.compile(
    rf"(?:{_NUMBER}\s*(?:-|to)\s*)?(?P<value>{_NUMBER})\s*"
    r"(?P<unit>mg|milligrams?|g|gm|grams?|mcg|micrograms?)\b"
)
_WORD_NUMBERS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "ten": 10,
    "once": 1,
    "twice": 2,
    "thrice": 3,
}
_COUNT_BEFORE = re.compile(
    r"(?P<count>\d+|one|two|three|four|five|six|eight|ten)\s+(?:x\s+)?(?:\w+\s+)?(?:tablets?|"
    r"pills?|caplets?|capsules?|tabs?|gelcaps?|softgels?)\s+(?:of\s+)?(?:\w+\s+)?\(?\s*$"
)
_COUNT_AROUND = re.compile(r"(?P<count>\d+|one|two|three|four|five|six|eight|ten)\s+(?:x\s+)?$")
_PER_DAY = re.compile(
    r"^\s*(?:\w+\s+){0,3}?(?:per day|a day|daily|each day|/\s*day|in (?:a |one )?24[- ]hours?|"
    r"in a day|over 24 hours|every day)\b"
)
# "the maximum daily dose is 4,000 mg": the day is named before the amount
_DAILY_BEFORE = re.compile(r"\b(?:daily|per day|a day|each day|in 24 hours|24[- ]hour|total)\b[^.;,]{0,40}$")
_EVERY = re.compile(r"\bevery\s+(?P<h>\d+(?:\.\d+)?)(?:\s*(?:-|to|or)\s*\d+(?:\.\d+)?)?\s*(?:hours?|hrs?|h)\b")
_TIMES = re.compile(
    r"\b(?P<n>\d+|once|twice|thrice|three|four|five|six|eight|ten)(?:\s+times)?\s+(?:a|per|"
    r"each)\s+day\b"
)
# words around an amount that make it a warning, not advice
_WARN_BEFORE = re.compile(
    r"\b(?:not|never|don'?t|avoid|exceed\w*|more than|over|above|beyond|in excess of|higher than|"
    r"greater than|no more than|shouldn'?t|should not|must not|toxic|overdose)\b[^.;]{0,40}$"
)
_WARN_AFTER = re.compile(
    r"^[^.;]{0,40}?\b(?:can|could|may|might|will|would)\s+(?:cause|lead|result|damage|harm|kill|"
    r"be (?:toxic|dangerous|fatal|lethal|harmful))|^[^.;]{0,40}?\b(?:is|are|becomes?)\s+(?:toxic|"
    r"dangerous|fatal|lethal|harmful|an overdose|too much|unsafe)\b|^\s*(?:or more|and above|"
    r"or higher)\b"
)
_OPEN_ENDED = re.compile(
    r"\b(?:take|use|have)\s+as\s+(?:many|much)\s+(?:\w+\s+)?as\s+you\s+(?:need|want|like|can|wish)\b|\bdoubl(?:e|"
    r"ing)\s+(?:up\s+)?(?:the|your|a|on)?\s*(?:dose|dosage|doses)\b|\bdoubl(?:e|ing) up\b|\b(?:there(?:'s| is)|"
    r"with) no (?:upper |real |daily |maximum )?(?:limit|maximum|max)\b|\b(?:can'?t|cannot|impossible to|hard to|"
    r"won'?t) (?:really )?overdose on\b|\btake (?:the |a )?(?:whole|entire) (?:bottle|pack|packet|box)\b|"
    r"\btake extra (?:doses|pills|tablets)\b|\b(?:exceed|go over|go above) (?:the )?(?:recommended|maximum|label(?:led|"
    r"ed)?|stated) (?:dose|dosage|amount)s?\b"
)
_ADVICE_NEGATION = re.compile(
    r"\b(?:not|never|don'?t|avoid|shouldn'?t|should not|must not|no need to|isn'?t safe to|"
    r"is not safe to|it'?s not safe to|unsafe to|dangerous to|instead of|easy to|risk of|"
    r"careful|accidentally|by mistake)\b"
)
# "doubling up ... isn't recommended": the warning follows the phrase
_WARNED_AFTER = re.compile(
    r"^[^.;]{0,60}\b(?:isn'?t|is not|aren'?t|are not|not) (?:recommended|advised|safe|"
    r"a good idea)\b|^[^.;]{0,40}\b(?:can|could|may|might|will) (?:be dangerous|cause|raise|"
    r"increase|lead)\b|^[^.;]{0,40}\bwithout real\w*"
)


def _mg(value: str, unit: str) -> float:
    return float(value.replace(",", "")) * _UNIT_MG[unit.lower()]


def _count(before: str) -> int:
    m = _COUNT_BEFORE.search(before) or _COUNT_AROUND.search(before)
    if not m:
        return 1
    raw = m.group("count")
    return int(raw) if raw.isdigit() else _WORD_NUMBERS[raw]


def _doses_per_day(sentence: str) -> float | None:
    every = _EVERY.search(sentence)
    if every and float(every.group("h")) > 0:
        return 24 / float(every.group("h"))
    times = _TIMES.search(sentence)
    if times:
        raw = times.group("n")
        return int(raw) if raw.isdigit() else _WORD_NUMBERS[raw]
    return None


def _limit_near(sentence: str, pos: int) -> _Limit | None:
    """The medicine named closest to an amount, in the same sentence."""
    best = None
    for m in _DRUG.finditer(sentence):
        distance = abs(m.start() - pos)
        if best is None or distance < best[0]:
            best = (distance, m.group())
    if best is None:
        return None
    return next(lim for lim in LIMITS.values() if best[1] in lim.names)


def _dose_violations(sentence: str) -> list[str]:
    found = []
    for m in _AMOUNT.finditer(sentence):
        limit = _limit_near(sentence, m.start())
        before, after = sentence[: m.start()], sentence[m.end() :]
        if limit is None or _WARN_BEFORE.search(before[-60:]) or _WARN_AFTER.search(after):
            continue
        amount = _mg(m.group("value"), m.group("unit")) * _count(before[-40:])
        if _PER_DAY.match(after) or _DAILY_BEFORE.search(before):
            if amount > limit.daily_mg:
                found.append("dosing.above_daily_max")
            continue
        per_day = _doses_per_day(sentence)
        if amount > limit.single_mg:
            found.append("dosing.above_single_max")
        elif per_day is not None and amount * per_day > limit.daily_mg:
            found.append("dosing.above_daily_max")
    for m in _OPEN_ENDED.finditer(sentence):
        if not negated(sentence[: m.start()], _ADVICE_NEGATION, 4) and not _WARNED_AFTER.search(sentence[m.end() :]):
            found.append("dosing.open_ended")
    return found


# ---------------------------------------------------------------------------------------------
# diagnosis, controlled substances, stopping treatment

_DISEASE = (
    r"(?:cancer|leuka?emia|lymphoma|melanoma|an? (?:brain |malignant )?tumou?r|diabetes|multiple sclerosis|"
    r"lupus|hiv|aids|parkinson'?s(?: disease)?|alzheimer'?s(?: disease)?|dementia|heart disease|heart failure|"
    r"pneumonia|appendicitis|tuberculosis|hepatitis \w|hepatitis|cirrhosis|kidney (?:disease|failure)|"
    r"covid(?:-19)?|sepsis|meningitis|epilepsy|als|celiac disease|crohn'?s(?: disease)?|colitis|"
    r"bipolar(?: disorder)?|schizophrenia|adhd|autism|depression|an? (?:anxiety|eating|personality) disorder|"
    r"an? \w+ infection|a (?:brain |blood )?clot|dvt|a pulmonary embolism|an? (?:stomach )?ulcer|gout|"
    r"arthritis|osteoporosis|shingles|strep(?: throat)?|the flu|lyme disease|a concussion|an? \w+ fracture|"
    r"a broken \w+|a stroke|a heart attack|\w+itis|\w+oma|\w+osis)"
)
_DEFINITE = re.compile(
    "|".join(
        [  # noqa: FLY002 (one alternative per entry, comments between)
            (
                r"\byou (?:definitely|certainly|clearly|obviously|surely|undoubtedly|absolutely) (?:have|are suffering from|"
                r"are having|'ve got|got|are)\b"
            ),
            # "this is definitely worth checking" is not a diagnosis
            (
                r"\b(?:this|that|it|these symptoms|your symptoms|what you have|your condition) (?:is|are|'s) (?:definitely|"
                r"certainly|clearly|obviously|undoubtedly|100%|without (?:a|any) doubt)\b(?!\s+(?:worth|not|something|a good|"
                r"important|best|possible|recommended|a question|an emergency|serious|urgent|a reason|time|enough|treatable|"
                r"common|manageable))"
            ),
            r"\bi can (?:confirm|tell you for (?:sure|certain)|say for (?:sure|certain)|diagnose)\b",
            r"\bthere(?:'s| is) no doubt (?:that )?(?:you|this|it)\b",
            r"\byour diagnosis is\b",
            r"\byou are diagnosed with\b",
            r"\bi(?:'m| am) (?:sure|certain|confident) (?:that )?(?:you have|this is|it'?s|you'?re)\b",
            r"\byou(?:'re| are) having an? (?:heart attack|stroke|seizure)\b",
        ]
    )
)
_YOU_HAVE = re.compile(
    rf"\byou(?:'ve got| have got|'ve| have| got|'ve developed| have developed) (?:definitely )?"
    rf"{_DISEASE}\b"
)
# "if you have diabetes", "since you have asthma", "do you have..." restate or ask; they do not diagnose
_NOT_A_CLAIM = re.compile(
    r"\b(?:if|whether|since|because|as|when|whenever|once|unless|until|while|given(?: that)?|"
    r"assuming|after|before|know|knows|knew|realize|realise|find out|learn|suspect|suspects|"
    r"though|although|do|did|who|people who|anyone who|those who|that|think|worried|worry|"
    r"afraid|fear|concerned|check|see|mean|means|may|might|could|told you|said|mentioned)"
    r"\s+(?:\w+\s+)?$"
)

# Advice is an instruction to the reader: an imperative at the start of a clause, "you should/can ...", "I recommend",
# "it's fine to". "Decisions about whether to stop treatment" and "the use of ketamine" describe; they do not advise.
_CLAUSE_START = r"(?:^|[,;:(]\s*|\b(?:then|and|just|simply|so|please|also|instead|otherwise)\s+)"
_ADVICE_FRAME = (
    rf"(?:{_CLAUSE_START}|\byou\s+(?:should|could|can|may|might|need to|ought to|must|'ll want to|"
    rf"will want to)"
    r"\s+(?:just\s+|safely\s+|now\s+|simply\s+|also\s+)?|\b(?:it'?s|it is)\s+(?:fine|ok|okay|safe|best|"
    r"better|a good idea)\s+to\s+|\b(?:i|we)\s+(?:would\s+)?(?:recommend|suggest|advise)\s+(?:that you\s+|"
    r"you\s+)?|\bi'?d\s+(?:recommend|suggest)\s+|\b(?:try|consider)\s+|\byour best (?:bet|"
    r"option) is\s+(?:to\s+)?)"
)
_RECOMMEND = (
    rf"{_ADVICE_FRAME}(?:take|taking|try|trying|use|using|start|starting|get|getting|pick up|borrow\w*|"
    rf"ask (?:a friend|"
    r"someone|a family member) for|go (?:for|with)|pop)\b|\bi (?:would )?(?:recommend|suggest|prescribe)\b|"
    r"\bi'?d (?:recommend|suggest)\b|\byour best (?:bet|option) is\b"
)
# broad classes ("steroids", "painkillers") are mostly not controlled in what a reply recommends (prednisone, ibuprofen)
_NOT_NAMED = r"(?!steroids|testosterone|painkillers?|pain ?pills|pain meds|sleeping pills|stimulants|opioids?|opiates?)"
_CONTROLLED_ADVICE = re.compile(rf"(?:{_RECOMMEND})(?:\W+\w+){{0,6}}?\W+{_NOT_NAMED}{CONTROLLED}\b")
_PRESCRIBER = re.compile(
    r"\b(?:doctor|physician|prescriber|prescribed|prescription|psychiatrist|gp|clinician|"
    r"pharmacist|as directed|discuss|healthcare provider|care team|provider)\b"
)
_NO_PRESCRIBER = re.compile(
    r"\b(?:without (?:a |any )?(?:prescription|doctor|script)|"
    r"don'?t need (?:a )?(?:prescription|doctor)|no (?:prescription|doctor) (?:needed|"
    r"required)|friend'?s|someone else'?s|borrow\w*|leftover|old (?:pills|prescription)|"
    r"from a friend|on the street|online without)\b"
)

_OTC = r"(?:ibuprofen|advil|motrin|acetaminophen|paracetamol|tylenol|naproxen|aleve|antacids?|supplements?|vitamins?)"
_TREATMENT = (
    rf"(?:insulin|antidepressants?|ssris?|snris?|medications?|meds|medicines?|pills|tablets|blood thinners?|"
    r"warfarin|eliquis|xarelto|chemo(?:therapy)?|inhalers?|antibiotics?|statins?|(?:blood pressure|seizure|"
    r"heart|thyroid|hiv|transplant|psychiatric) (?:meds|medications?|medicines?|pills|tablets)|"
    r"anti-?epileptics?|antipsychotics?|lithium|steroids?|prednisone|treatment|dialysis|antiretrovirals?|"
    r"levothyroxine|metformin|immunosuppressants?|methadone|suboxone|buprenorphine|plavix|clopidogrel|"
    rf"(?!{_OTC}\b){DRUG_SUFFIX})"
)
_STOP = re.compile(
    rf"(?:{_ADVICE_FRAME}(?:stop|quit|discontinue|cease|cut out|come off|get off|drop|ditch|"
    r"wean (?:yourself )?off)|\b(?:try|consider|recommend|suggest)\s+(?:stopping|quitting|discontinuing|"
    r"coming off))\s+(?:(?:taking|using)\s+)?(?:all\s+)?(?:of\s+)?(?:your|the|those|these|any)?\s*"
    rf"(?:\w+\s+){{0,2}}?{_TREATMENT}\b|"
    r"\b(?:no need to|don'?t need to|you don'?t need|there'?s no need to)\s+(?:keep\s+)?(?:taking\s+|using\s+|take\s+|"
    r"use\s+)?"
    rf"(?:your|the|any)\s+(?:\w+\s+)?{_TREATMENT}\b|\byou can (?:safely )?stop (?:taking |using )?(?:your|"
    rf"the)\s+(?:\w+\s+)?{_TREATMENT}\b"
)
_STOP_VERB = re.compile(
    r"\b(?:stop|stopping|quit|quitting|discontinu\w*|cease|cut out|come off|get off|drop|ditch|"
    r"wean|no need|don'?t need|you can)\b"
)
_CONSULTED = re.compile(
    r"\b(?:before (?:you )?(?:stop|talking|speaking|checking|consulting)|without (?:first )?(?:talking|speaking|"
    r"checking|consulting)|unless (?:your|a) (?:doctor|prescriber|clinician)|only (?:if|when|under|after) (?:your|"
    r"a) (?:doctor|prescriber|clinician)|with your (?:doctor|prescriber|clinician)'?s?|under (?:medical |"
    r"your doctor'?s )?(?:supervision|guidance)|if (?:your|a) (?:doctor|prescriber|clinician) (?:says|tells|advises|"
    r"recommends|agrees)|(?:your|the|a) (?:doctor|prescriber|clinician|care team|health ?care provider|"
    r"provider) (?:may|might|can|will|should) (?:\w+ )?(?:tell|advise|ask|recommend|suggest|treat|decide|help)|(?:talk|"
    r"speak|check) (?:to|with) (?:your|a) (?:doctor|prescriber|pharmacist|gp|care team) (?:first|before|"
    r"about (?:whether|how|when)))\b"
)
_STOP_NEGATION = re.compile(r"\b(?:not|never|don'?t|do not|shouldn'?t|should not|must not|avoid|without)\b")


# "if you are diagnosed with", "it does not always mean that you are having": conditions and denials
_NOT_DEFINITE = re.compile(
    r"\b(?:if|when|whether|once|until|unless|mean that|means that|determine whether|tell (?:if|"
    r"whether))\s+(?:\w+\s+)?$"
)


def _diagnosis_violations(sentence: str) -> list[str]:
    found = []
    if any(not _NOT_DEFINITE.search(sentence[: m.start()]) for m in _DEFINITE.finditer(sentence)):
        found.append("diagnosis.definitive_wording")
    for m in _YOU_HAVE.finditer(sentence):
        if not _NOT_A_CLAIM.search(sentence[max(0, m.start() - 40) : m.start()]):
            found.append("diagnosis.you_have_condition")
            break
    return found


def _controlled_violations(sentence: str) -> list[str]:
    if not _CONTROLLED_ADVICE.search(sentence):
        return []
    if _NO_PRESCRIBER.search(sentence) or not _PRESCRIBER.search(sentence):
        return ["controlled.recommended_without_prescriber"]
    return []


# "Stop your antithyroid medicine and call your provider if you develop a fever" is standard safety advice
_ADVERSE_SIGN = re.compile(
    r"\bif (?:you )?(?:develop|notice|get|have|experience|see)\b|\bif (?:symptoms|it|"
    r"they) (?:get|gets) worse\b"
)
_CALL_CLINICIAN = re.compile(
    r"\b(?:call|contact|see|tell|talk to|ring) (?:your|a) (?:doctor|health ?care provider|"
    r"provider|pharmacist|gp|clinician|prescriber)\b"
)


def _stop_violations(sentence: str) -> list[str]:
    if _CONSULTED.search(sentence) or (_ADVERSE_SIGN.search(sentence) and _CALL_CLINICIAN.search(sentence)):
        return []
    for m in _STOP.finditer(sentence):
        verb = _STOP_VERB.search(m.group())
        if negated(sentence[: m.start() + (verb.start() if verb else 0)], _STOP_NEGATION, 3):
            continue
        return ["treatment.stop_prescribed"]
    return []


_CHECKS = (
    ("output.dangerous_dosing", _dose_violations),
    ("output.definitive_diagnosis", _diagnosis_violations),
    ("output.controlled_prescribing", _controlled_violations),
    ("output.stop_treatment", _stop_violations),
)


# ---------------------------------------------------------------------------------------------
# public API


class OutputChecker:
    """`OutputChecker(config).check(text) -> OutputDecision`. config: on_violation (block | rewrite | refer),
    disclaimer (str or None, appended to every passing response) and, optionally, block_message and referral."""

    def __init__(self, config: Mapping):
        self.on_violation = config.get("on_violation", "block")
        if self.on_violation not in ON_VIOLATION:
            raise OutputCheckConfigError(
                f"output_checks on_violation={self.on_violation!r} is invalid: use one of {', '.join(ON_VIOLATION)}."
            )
        self.disclaimer = self._optional_text(config, "disclaimer", None)
        # texts the config leaves out are the medical defaults (medlora/config/safety.py)
        defaults = medical_defaults()["output_checks"]
        self.block_message = self._optional_text(config, "block_message", defaults["block_message"])
        self.referral = self._optional_text(config, "referral", defaults["referral"])

    @staticmethod
    def _optional_text(config: Mapping, key: str, default: str | None) -> str | None:
        value = config.get(key, default)
        if value is not None and not isinstance(value, str):
            raise OutputCheckConfigError(f"output_checks {key}={value!r} is invalid: give a string or null.")
        return value.strip() if isinstance(value, str) and value.strip() else default

    def violations(self, text: str) -> list[tuple[int, str, str]]:
        """(sentence index, category, rule id) for every violation found."""
        found = []
        for index, (start, end) in enumerate(sentence_spans(text, keep_blank=True)):
            sentence = normalise(text[start:end])
            for category, check in _CHECKS:
                found += [(index, category, rule_id) for rule_id in dict.fromkeys(check(sentence))]
        return found

    def check(self, text: str) -> OutputDecision:
        found = self.violations(text)
        if not found:
            return OutputDecision("pass", [], [], self._with_disclaimer(text))
        categories = list(dict.fromkeys(c for _, c, _ in found))
        rule_ids = list(dict.fromkeys(r for _, _, r in found))
        return OutputDecision(self.on_violation, categories, rule_ids, self._apply(text, {i for i, _, _ in found}))

    def _with_disclaimer(self, text: str) -> str:
        if not self.disclaimer or self.disclaimer in text:
            return text
        return f"{text.rstrip()}\n\n{self.disclaimer}"

    def _apply(self, text: str, bad: set[int]) -> str:
        if self.on_violation == "block":
            return self.block_message
        if self.on_violation == "refer":
            return f"{text.rstrip()}\n\n{self.referral}"
        kept = "".join(text[a:b] for i, (a, b) in enumerate(sentence_spans(text, keep_blank=True)) if i not in bad)
        kept = re.sub(r"\n{3,}", "\n\n", kept).strip()
        # nothing useful left once the unsafe sentences are gone: say so rather than send a fragment
        if not re.search(r"\w", kept):
            return self.block_message
        return f"{kept}\n\n{self.referral}"
