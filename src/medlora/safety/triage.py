"""Input triage before generation: emergency > crisis > refuse > allow, by rules OR a learned model.

`Triage.check_messages` reads the whole conversation: the rules below judge the latest user turn (with
the one before it as context) and keep their precise red flags; the triage model
(`safety.triage.model`, medlora.safety.triage_model) reads every turn and adds recall; the more
severe answer wins. A conversation already answered with the emergency or crisis reply stays on
that path for every later turn, until a new conversation starts.

The rules:

Each rule is one or more patterns over symptom, intent or request vocabularies. A symptom match
counts only when it describes something happening now to someone: it is not negated ("no chest
pain"), not inside a conditional ("what should I do if someone is choking"), not part of a general
question with no one in it ("what are the signs of a stroke?"), not anchored in the past ("my dad had
a heart attack last year") and not a habit ("I get short of breath when I run"). Intent (crisis)
matches drop the habit and recent-past filters: "sometimes I think about killing myself" is a crisis.
Requests for help with harm (refuse) are judged on their wording alone.
"""

from __future__ import annotations

import bisect
import itertools
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from medlora.safety.settings import medical_defaults
from medlora.safety.text import clause_starts, negated, normalise, sentence_spans

ACTIONS = ("emergency", "crisis", "refuse", "allow")
_ACTION_OF = {"emergency": "emergency", "crisis": "crisis", "harm": "refuse"}

# Which placeholder each reply must contain: a reply that names no one to call defeats its purpose.
_REQUIRED_PLACEHOLDER = {
    "emergency_reply": "emergency_number",
    "crisis_reply": "crisis_line",
    "refuse_reply": "emergency_number",
}


class TriageConfigError(ValueError):
    """A bad triage setting: the message names the key and the fix."""


@dataclass
class Decision:
    action: str
    categories: list[str]
    rule_ids: list[str]
    reply: str | None
    # who chose `action`: "rules", "model", "sticky" (an earlier turn's path), joined by "+"; "" for allow
    source: str = "rules"
    scores: dict[str, float] | None = field(default=None)  # the model's label probabilities, when it ran

    @property
    def answered(self) -> bool:
        """True when triage answers with its fixed reply and the model is not called."""
        return self.action != "allow"


# ---------------------------------------------------------------------------------------------
# vocabulary


def _alt(*words: str) -> str:
    return "(?:" + "|".join(words) + ")"


def _near(a: str, b: str, gap: int = 3) -> str:
    """`a`, up to `gap` words, then `b`, within one sentence."""
    return rf"{a}(?:[^\w.!?;\n]+\w+){{0,{gap}}}?[^\w.!?;\n]+{b}"


def _either(a: str, b: str, gap: int = 3) -> str:
    return _near(a, b, gap) + "|" + _near(b, a, gap)


CANT = r"(?:can'?t|cannot|can not|couldn'?t|could not|unable to|not able to|struggling to|struggles to|fighting to)"
HARD = r"(?:hard to|hardly|barely|trouble|difficulty|a hard time|having trouble)"
THEM = r"(?:him|her|them|my \w+|the baby|the kid|the child)"
POSS = r"(?:my|his|her|their|the|our)"
ONE_SIDE_LIMB = r"(?:left|right) (?:arm|leg|hand|side|foot)"
BREATH = r"(?:breath\w*|brea?th|breth\w*|get (?:a |any |enough )?(?:air|breath)|catch (?:my|his|her|their|a) breath)"
NOT_NOSE = r"(?!\s+(?:through|out of|in through|with) (?:my|his|her|their|the|one) (?:nose|nostrils?))"
CHILD = _alt(
    r"child",
    r"kid",
    r"son",
    r"daughter",
    r"toddler",
    r"baby",
    r"infant",
    r"boy",
    r"girl",
    r"grandson",
    r"granddaughter",
    r"nephew",
    r"niece",
    r"little one",
    r"\d+[- ]?(?:year|yr|month|mo)s?[- ]?old",
)
_MED_WORDS = _alt(
    r"pills?",
    r"tablets?",
    r"capsules?",
    r"medications?",
    r"medicines?",
    r"meds",
    r"gummies",
    r"vitamins?",
    r"patch(?:es)?",
    r"tylenol",
    r"paracetamol",
    r"acetaminophen",
    r"ibuprofen",
    r"advil",
    r"motrin",
    r"aspirin",
    r"iron",
    r"benadryl",
    r"melatonin",
    r"insulin",
    r"\w+ pills",
)
CONTROLLED = _alt(
    r"oxycodone",
    r"oxys?",
    r"oxycontin",
    r"percocets?",
    r"percs?",
    r"roxicodone",
    r"roxys?",
    r"vicodin",
    r"norco",
    r"hydrocodone",
    r"fentanyl",
    r"morphine",
    r"codeine",
    r"tramadol",
    r"dilaudid",
    r"hydromorphone",
    r"methadone",
    r"opana",
    r"oxymorphone",
    r"tapentadol",
    r"nucynta",
    r"demerol",
    r"suboxone",
    r"buprenorphine",
    r"subutex",
    r"heroin",
    r"opioids?",
    r"opiates?",
    r"xanax",
    r"xannies",
    r"alprazolam",
    r"valium",
    r"diazepam",
    r"klonopin",
    r"clonazepam",
    r"ativan",
    r"lorazepam",
    r"benzos?",
    r"benzodiazepines?",
    r"temazepam",
    r"adderall",
    r"addys?",
    r"ritalin",
    r"methylphenidate",
    r"vyvanse",
    r"dexedrine",
    r"dextroamphetamine",
    r"amphetamines?",
    r"concerta",
    r"focalin",
    r"modafinil",
    r"provigil",
    r"ambien",
    r"zolpidem",
    r"lunesta",
    r"ketamine",
    r"ghb",
    r"rohypnol",
    r"phentermine",
    r"testosterone",
    r"steroids",
    r"trenbolone",
    r"soma",
    r"carisoprodol",
    r"lyrica",
    r"pregabalin",
    r"barbiturates?",
    r"phenobarbital",
    r"cocaine",
    r"meth",
    r"methamphetamine",
    r"mdma",
    r"ecstasy",
    r"painkillers?",
    r"pain ?pills",
    r"pain meds",
    r"sleeping pills",
    r"stimulants",
    r"controlled (?:substances?|drugs?|meds|medications?)",
)
POISONS = _alt(
    r"bleach",
    r"drain cleaner",
    r"anti-?freeze",
    r"(?:windshield |windscreen )?washer fluid",
    r"windshield fluid",
    r"rat poison",
    r"ant poison",
    r"poison(?! (?:ivy|oak|sumac|control))",
    r"pesticides?",
    r"insecticides?",
    r"weed ?killer",
    r"herbicides?",
    r"lye",
    r"caustic soda",
    r"(?:button |lithium |coin )?batter(?:y|ies)",
    r"magnets",
    r"detergent",
    r"(?:laundry|tide|dishwasher) pods?",
    r"cleaning (?:product|fluid|solution|spray|chemicals?)",
    r"lighter fluid",
    r"gasoline",
    r"petrol",
    r"kerosene",
    r"lamp oil",
    r"methanol",
    r"rubbing alcohol",
    r"isopropyl",
    r"hand sanitizer",
    r"nail polish remover",
    r"acetone",
    r"oven cleaner",
    r"ammonia",
    r"turpentine",
    r"paint thinner",
    r"wild mushrooms?",
    r"mushrooms? from the (?:yard|garden|woods|lawn)",
    r"oleander",
    r"foxglove",
    r"(?:berries|mushrooms|toadstools|leaves|seeds|plants?) (?:from|off|in|growing)",
    r"poisonous \w+",
    r"toxic",
    r"e-?liquid",
    r"vape (?:juice|liquid)",
    r"nicotine",
    r"mothballs?",
    r"chemicals?",
    r"(?:dishwasher|washing[- ]up|dish|laundry|cleaning|toilet|bathroom|floor) (?:liquid|soap|detergent|powder|"
    r"tablets?|pods?|cleaner|fluid|gel)",
    r"\w+ cleaner",
)
DRUG_CLASS = _alt(
    r"antidepressants?",
    r"antibiotics?",
    r"sedatives?",
    r"painkillers?",
    r"pain ?killers?",
    r"opioids?",
    r"stimulants?",
    r"antihistamines?",
    r"blood thinners?",
    r"antipsychotics?",
    r"anti-?seizure \w+",
    r"(?:heart|blood pressure|bp|diabetes|thyroid|seizure|sleeping|sleep|allergy|cold|cough) (?:pills?|"
    r"tablets?|meds|medicines?|medications?|syrup)",
    r"cough syrup",
    r"\w+ syrup",
)
# generic drug names share endings (-pril, -olol, -statin, -azepam ...): a cheap way to recognise most of them
DRUG_SUFFIX = (
    r"\w+(?:pril|sartan|olol|dipine|statin|azepam|zolam|oxetine|opram|triptyline|ipramine|codone|morphone|"
    r"mycin|cillin|cycline|floxacin|prazole|tidine|formin|gliptin|semide|thiazide|profen|barbital|apine|"
    r"idone|azine|clone|zepam|pidem|tadine|xaban|farin|gabalin|pentin|trigine|iracetam|proate|traline|faxine|azodone|zapine|peridol|tropin)"
)
MEDS = _alt(_MED_WORDS, CONTROLLED, DRUG_CLASS, DRUG_SUFFIX)
PEOPLE = _alt(
    r"husband",
    r"wife",
    r"hubby",
    r"spouse",
    r"partner",
    r"boyfriend",
    r"girlfriend",
    r"bf",
    r"gf",
    r"ex",
    r"ex-?(?:wife|husband|boyfriend|girlfriend)",
    r"mom",
    r"mum",
    r"mother",
    r"dad",
    r"father",
    r"parents?",
    r"step-?(?:mom|dad|mother|father|son|daughter)",
    r"boss",
    r"manager",
    r"co-?workers?",
    r"colleagues?",
    r"room-?mates?",
    r"flatmates?",
    r"housemates?",
    r"neighbou?rs?",
    r"teachers?",
    r"classmates?",
    r"brother",
    r"sister",
    r"siblings?",
    r"son",
    r"daughter",
    r"kids?",
    r"child(?:ren)?",
    r"baby",
    r"friends?",
    r"grandma",
    r"grandmother",
    r"grandpa",
    r"grandfather",
    r"in-?laws?",
    r"(?:mother|father|sister|brother)-in-law",
    r"uncle",
    r"aunt",
    r"cousin",
    r"date",
    r"girl",
    r"guy",
    r"man",
    r"woman",
    r"person",
    r"people",
    r"someone",
    r"somebody",
    r"anyone",
    r"him",
    r"her",
    r"them",
    r"enemy",
    r"rival",
    r"landlord",
    r"tenant",
    r"patient",
    r"elderly \w+",
    r"old (?:man|woman|lady)",
    r"victim",
    r"wife'?s",
    r"husband'?s",
    r"family",
    r"families",
    r"household",
)
PERSON_OBJ = (
    rf"(?:(?:my|his|her|their|our|a|an|the|this|that|some|someone'?s|"
    rf"somebody'?s)\s+)?(?:[\w'-]+\s+)?{PEOPLE}\b"
)
# "I'm going to", "im gonna", "I want to": a stated plan in the first person
I_WILL = (
    r"(?:(?:i(?:'m| am)|im) (?:going|gonna|planning)|i (?:want|wanna|need|plan|intend|will|would like)|i'll|"
    r"i (?:am|'m) gonna)"
)


# ---------------------------------------------------------------------------------------------
# context: which sentence a match is in, and what that sentence says about time and person

_QUESTION_START = re.compile(
    r"^\W*(?:(?:hi|hey|hello|ok|okay|so|um|uh|quick question|question|just wondering|sorry|please|also|and|"
    r"but)\W+)*(?:what|what'?s|whats|how|how'?s|why|when|which|who|where|is|are|can|could|does|do|did|should|would|"
    r"will|may|might|must|any|explain|tell me|describe|define|list)\b"
)
_TEACH = re.compile(r"\b(?:how to|what to do|signs? of|symptoms? of|first aid|what happens)\b")
# "What is a thunderclap headache?" asks for a definition; "what is this pain" does not
_DEFINE = re.compile(
    r"^\W*(?:(?:so|ok|okay|hi|hey|hello)\W+)*(?:what(?:'s| is| are| was)|whats)\s+(?!(?:(?:a|an|"
    r"the)\s+)?(?:this|that|these|those|happening|going on|wrong|it|my|his|her|he|she|point|use|"
    r"reason|sense)\b)"
)
# The asker's own words ("how do I help", "I'm studying") say nothing about who is ill.
_ASKER = re.compile(
    r"\b(?:how|what|when|where|why|which|who|should|can|could|do|does|would|will|shall|must|may|"
    r"might)\s+(?:\w+\s+){0,2}?(?:i|we)\b(?:\s+(?:do|help|know|tell|recogni[sz]e|spot|treat|handle|respond|react|say|"
    r"give|use|check|need|call|go|get|take|stop|prevent|support|talk|perform|learn|find|look|watch|keep|make|be|have|"
    r"wait|best))?|\bi(?:'m| am|m)? (?:curious|wondering|studying|learning|writing|reading|asking|researching|"
    r"preparing|training|a (?:nurse|student|medic|doctor|caregiver|teacher|parent|paramedic)|an? \w+ student)\b|"
    r"\bfor (?:my|a|our) (?:\w+ )?(?:class|course|exam|first aid|nursing|paper|essay|project|boards|training)\w*"
)
_PERSONAL = re.compile(
    r"\b(?:i|i'?m|im|i'?ve|ive|i'?d|i'?ll|me|myself|we|we'?re|us)\b|\b(?:my|our)\b(?!\s+(?:class|course|exams?|"
    r"homework|assignment|paper|essay|project|textbook|lecture|studies|research|thesis|question|understanding|"
    r"curiosity|first aid|nursing|school|job|work)\b)|\b(?:he|she|they)(?:'s|'re| is| are| has| have| was| can'?t|"
    r" cannot| won'?t| isn'?t| wasn'?t| keeps| just| seems| looks| feels| says| said)\b|\b(?:hes|shes|theyre)\b|"
    r"\bthis (?:guy|man|woman|lady|kid|boy|girl|person|baby)\b|\bhere\b(?!\s+(?:are|is|'s))|\bright now\b"
)
_GENERIC = re.compile(
    r"\b(?:someone|somebody|anyone|anybody|a person|people|persons|a patient|patients|one|you|your|yourself|a child|"
    r"children|kids|a kid|a baby|babies|an? (?:adult|elderly|older|man|woman|teen|teenager|infant|toddler)|adults|"
    r"women|men|elderly|teens|teenagers|a \d+[- ]?(?:year|yr)[- ]?old|they|them|their|those|a friend|a loved one|"
    r"a family member)\b"
)
_EDU = re.compile(
    r"\b(?:signs?|symptoms?|warning|causes?|caused|risks?|mean|means|meaning|recogni[sz]e|identify|spot|first aid|"
    r"what to do|how to|treat|treated|treatment|treatments|prevent|prevention|difference|differ|normal|common|"
    r"typical(?:ly)?|usually|always|happens?|explain|define|definition|class|course|exam|boards|studying|study|paper|"
    r"essay|nursing|considered|diagnos\w*|likely|help|respond|handle|manage|know if|tell if|look like|feel like|"
    r"indicate|possible|true)\b"
)
# Education about suicide and self-harm ("how effective is therapy for self-harm?"); "is it normal to want to
# die?" is left out on purpose: it is usually about the asker.
_EDU_STRONG = re.compile(
    r"\b(?:signs?|symptoms?|warning|causes?|risk|risks|recogni[sz]e|identify|spot|what to do|how to|treat\w*|"
    r"prevent\w*|therapy|therapies|therapist|effective|evidence|research|studies|study|statistics|rates?|class|course|"
    r"exam|essay|paper|nursing|school|schools|students|teens|teenagers|veterans|support|supporting|help|helping|"
    r"screen\w*|questionnaire|assess\w*|define|definition|explain|difference|why|happen\w*|handle|manage|cope|"
    r"deal with|common|paramedics|doctors|nurses|clinicians|parents|first aid|always|emergency|mean|means|meaning)\b"
)
# A textbook case ("a 60-year-old man presents with ...") is general even across sentences.
_VIGNETTE = re.compile(
    r"\ban? \d+[- ]?(?:year|yr|y)[- ]?o(?:ld)?\b(?: \w+)? (?:man|woman|male|female|patient|boy|"
    r"girl)\b|\b(?:a |the )?patient (?:presents|presented|comes in|came in|arrives|is brought)\b"
)

_DISTANT = re.compile(
    r"\b(?:last (?:year|month|summer|winter|spring|fall|autumn|christmas|decade)|(?:\d+|a|an|one|two|three|four|five|"
    r"six|seven|eight|nine|ten|few|couple(?: of)?|several|many) (?:years?|months?|weeks?|decades?) ago|years ago|"
    r"months ago|weeks ago|years back|this (?:year|month)|when (?:i|he|she|we|they) (?:was|were) (?:a |younger|little|"
    r"small|young|\d+|in )|as a (?:kid|child|teen|teenager|baby|toddler)|in (?:19|20)\d\d|back in|used to|history of|"
    r"a while (?:ago|back)|in the past|previously|since (?:my|his|her|their) (?:stroke|heart attack|seizure|surgery|"
    r"accident|diagnosis)|recovered|recovering)\b"
)
# an episode that is over: it names the whole sentence's episode, wherever it sits in the sentence
_RESOLVED = re.compile(
    r"\b(?:went away|goes away|has passed|it passed|passed after|resolved|turned out to be|"
    r"got better|(?:is|am|feel|feels|was|seems?) (?:totally |completely )?(?:fine|ok|okay|"
    r"normal) now|(?:now|then) (?:it'?s|he'?s|she'?s|i'?m) (?:totally |completely )?(?:fine|ok|okay|"
    r"normal))\b"
)
_RECENT = re.compile(
    r"\b(?:yesterday|last night|the other day|(?:\d+|a|two|three|few|couple(?: of)?) days ago|"
    r"days ago|earlier this week|over the weekend|last weekend|last week|a week ago)\b"
)
# a lasting after-effect ("his speech is still slurred since the stroke") keeps a past anchor in force
# across the whole sentence, not just its own clause
_CHRONIC = re.compile(
    r"\b(?:still|ever since|since then|residual|permanent\w*|left (?:him|her|me|them) with|"
    r"hasn'?t (?:fully )?recovered|recovering|ongoing|long[- ]term)\b"
)
_CLAUSE_BREAK = re.compile(r"[,;()]|\s-\s|\b(?:but|who|which|however|although|though|whereas|and now|now)\b")
_DEICTIC_NOW = re.compile(
    r"\b(?:right now|currently|at the moment|as we speak|as i (?:type|write)|"
    r"this (?:very )?(?:minute|second))\b"
)
_STRONG_NOW = re.compile(
    r"\b(?:right now|currently|at the moment|as we speak|as i (?:type|write)|just (?:now|started|happened)|(?:\d+|"
    r"a few|few|ten|twenty|thirty|an|a) (?:min|mins|minutes|hours?|hrs?) ago|again|came back|is back|started again|"
    r"today|tonight|this (?:morning|afternoon|evening))\b"
)
_WEAK_NOW = re.compile(r"\b(?:still|won'?t|wont|keeps|anymore)\b")
_HABIT = re.compile(
    r"\b(?:sometimes|often|usually|always|occasionally|every ?time|whenever|from time to time|on and off|every (?:day|"
    r"morning|night|week|few (?:days|weeks|months))|most (?:days|nights|mornings)|when(?:ever)? i (?:run|exercise|"
    r"climb|walk|work out|eat|drink|lie down|lay down|sleep|wake|cough|bend)|for (?:weeks|months|years)|"
    r"for the (?:past|last) (?:few )?(?:weeks|months|years)|at night|in the mornings|once a (?:week|month)|a day|"
    r"per day|daily|each day|a week|per week|(?:every|each|during) (?:my |her )?(?:period|month|cycle))\b"
)
_CONDITIONAL = re.compile(
    r"\b(?:what if|if|in case(?: of)?|suppose|supposing|imagine|hypothetically|let'?s say|in the event(?: of| that)?|"
    r"when(?:ever)? (?=(?:someone|somebody|a person|people|you|your|one|a child|a baby|a kid|kids|children|they|"
    r"an? \w+ (?:has|is|gets|goes|starts|collapses|stops))\b))"
)
# "not sure if he's breathing" and "as if an elephant is on my chest" are not conditionals
_NOT_CONDITIONAL = re.compile(
    r"(?:not sure|unsure|don'?t know|dont know|do not know|no idea|can'?t tell|cant tell|"
    r"not certain|wonder(?:ing)?|ask(?:ing|ed|s)?(?: me| us| him| her| them)?|check(?:ing)?|"
    r"see|even|as|like|idk)\s*$"
)
_CONDITIONAL_END = re.compile(
    r"[,;:]|\b(?:then|but|so|and now|because|what|how|should|could|do i|is it|is this|will|"
    r"would)\b"
)
_FIRST_PERSON = re.compile(r"\b(?:i|i'?m|im|i'?ve|ive|myself)\b")  # the subject, not "my child" or "tells me"
# a question someone else asks ("my therapist asked if I have thoughts of self-harm") reports, not discloses
_REPORTED = re.compile(
    r"\b(?:asked|asks|asking|ask) (?:me |us |him |her |them )?(?:if|whether|about)\b|\bscreen(?:ed|"
    r"ing|s)? (?:me |him |her |them )?for\b|\bwants? to know (?:if|whether)\b"
)

_NEG_CUE = re.compile(
    r"\b(?:no|not|never|without|denies|denied|deny|none|nor|neither|free of|absence of|negative for|ruled out|don'?t|"
    r"doesn'?t|didn'?t|isn'?t|aren'?t|wasn'?t|weren'?t|haven'?t|hasn'?t|hadn'?t|dont|doesnt|didnt|isnt|arent|wasnt|"
    r"havent|hasnt)\b"
)
_PSEUDO_NEG = re.compile(
    r"\b(?:not sure|not certain|not only|no idea|no one|nobody|no matter|not even sure|don'?t know|dont know|"
    r"do not know|didn'?t know|not know|doesn'?t know|don'?t understand|no clue|not long ago|no longer able|"
    r"doesn'?t want a fuss|not drunk|isn'?t drunk|don'?t want to wait|not kidding|not joking)\b"
)
_NEG_BREAK = re.compile(
    r"\b(?:but|however|though|although|except|yet|whereas|apart from|other than|now|then|still|"
    r"and i|and my|and he|and she|and it)\b|[,:]"
)
_NEG_WINDOW_WORDS = 6


@dataclass(frozen=True)
class _Clause:
    """Time of one clause: "she had a stroke 5 years ago, now she can't lift her arm" has two."""

    start: int
    past: str | None  # "distant" | "recent" | None
    now: str | None  # "deictic" | "strong" | "weak" | None
    habitual: bool


@dataclass(frozen=True)
class _Sentence:
    start: int
    end: int
    general: bool
    taught: bool  # a general question in an education frame; intent rules only give way to this
    generic_subject: bool
    personal: bool
    clauses: tuple[_Clause, ...]
    conditionals: tuple[tuple[int, int, bool], ...]  # (start, end, first person inside) in text offsets

    def clause_of(self, pos: int) -> _Clause:
        return next(c for c in reversed(self.clauses) if c.start <= pos)


def _conditionals(text: str, start: int, end: int) -> tuple[tuple[int, int, bool], ...]:
    found = []
    for m in _REPORTED.finditer(text, start, end):
        stop = _CONDITIONAL_END.search(text, m.end() + 1, end)
        found.append((m.start(), stop.start() if stop else end, False))
    for m in _CONDITIONAL.finditer(text, start, end):
        if _NOT_CONDITIONAL.search(text[max(start, m.start() - 30) : m.start()]):
            continue
        stop = _CONDITIONAL_END.search(text, m.end() + 1, end)
        scope_end = stop.start() if stop else end
        found.append((m.start(), scope_end, bool(_FIRST_PERSON.search(text, m.end(), scope_end))))
    return tuple(found)


def _now_of(s: str) -> str | None:
    return (
        "deictic"
        if _DEICTIC_NOW.search(s)
        else "strong"
        if _STRONG_NOW.search(s)
        else "weak"
        if _WEAK_NOW.search(s)
        else None
    )


def _clauses(text: str, start: int, end: int) -> tuple[_Clause, ...]:
    sentence = text[start:end]
    # a lasting after-effect or an episode that is over dates the whole sentence, not just its own clause
    all_past = (bool(_DISTANT.search(sentence)) and bool(_CHRONIC.search(sentence))) or bool(_RESOLVED.search(sentence))
    cuts = [*clause_starts(sentence, _CLAUSE_BREAK), len(sentence)]
    clauses = []
    for a, b in itertools.pairwise(cuts):
        part = sentence[a:b]
        past = "distant" if all_past or _DISTANT.search(part) else "recent" if _RECENT.search(part) else None
        clauses.append(_Clause(start + a, past, _now_of(part), bool(_HABIT.search(part))))
    return tuple(clauses)


def _analyse(text: str, start: int, end: int, previous: _Sentence | None, vignette: bool) -> _Sentence:
    s = text[start:end]
    asked_away = _ASKER.sub(" ", s)
    personal = bool(_PERSONAL.search(asked_away))
    generic = bool(_GENERIC.search(asked_away))
    question = "?" in s or bool(_QUESTION_START.match(s)) or bool(_TEACH.search(s))
    teaching = bool(_EDU_STRONG.search(asked_away)) or bool(_DEFINE.match(s))
    taught = question and not personal and (generic or teaching)
    general = taught or (question and not personal and bool(_EDU.search(asked_away)))
    # "What should you do when someone collapses? Not breathing, no pulse." keeps the general subject
    if previous is not None and previous.general and previous.generic_subject and not personal and not _now_of(s):
        general = True
    general = general or (vignette and not personal)
    return _Sentence(
        start, end, general, taught, generic, personal, _clauses(text, start, end), _conditionals(text, start, end)
    )


class _Doc:
    """Normalised text split into analysed sentences; `min_start` marks where the latest message begins."""

    def __init__(self, text: str, min_start: int = 0):
        self.text = text
        self.min_start = min_start
        vignette = bool(_VIGNETTE.search(text)) and not _PERSONAL.search(_ASKER.sub(" ", text))
        self.sentences: list[_Sentence] = []
        for start, end in sentence_spans(text):
            previous = self.sentences[-1] if self.sentences else None
            self.sentences.append(_analyse(text, start, end, previous, vignette))
        self._starts = [s.start for s in self.sentences]

    def sentence_of(self, pos: int) -> int:
        return max(0, bisect.bisect_right(self._starts, pos) - 1)

    def negated(self, sent: _Sentence, pos: int) -> bool:
        """A negation cue up to a few words before `pos`, with no contrast word or clause break between."""
        return negated(
            self.text[sent.start : pos], _NEG_CUE, _NEG_WINDOW_WORDS, breaks=_NEG_BREAK, pseudo=_PSEUDO_NEG, lists=True
        )


# ---------------------------------------------------------------------------------------------
# rules

EPISODE, INTENT, REQUEST = "episode", "intent", "request"


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    kind: str  # EPISODE: happening now; INTENT: self-harm thoughts or plans; REQUEST: asks for help with harm
    patterns: tuple[re.Pattern, ...]
    same_sentence: bool = False  # all patterns in one sentence (modifiers such as "on one side")
    recent_ok: bool = False  # an ingestion "last night" still needs care today (paracetamol harms late)
    unless: re.Pattern | None = None  # a sentence context that explains the finding away (Bell's palsy, a period)

    @property
    def action(self) -> str:
        return _ACTION_OF[self.category.split(".")[0]]


def _rule(id_: str, category: str, kind: str, *patterns: str, unless: str | None = None, **flags) -> Rule:
    return Rule(
        id_,
        category,
        kind,
        tuple(re.compile(p) for p in patterns),
        unless=re.compile(unless) if unless else None,
        **flags,
    )


# -- emergency vocabularies
CHEST_FEELING = (
    r"(?:pain|pains|pian|pressure|tight\w*|heav(?:y|iness)|squeez\w*|crush\w*|discomfort|hurts?|hurting|"
    r"ache|aching|burning|weight|killing me)"
)
# "pain in the middle of my chest" puts more words before "chest" than "chest feels so tight" after it
CHEST = (
    _near(r"\b(?:chest|breastbone|sternum)", CHEST_FEELING + r"\b", 6)
    + "|"
    + _near(r"\b" + CHEST_FEELING, r"(?:chest|breastbone|sternum)\b", 6)
    + "|"
    + _near(r"\b(?:heart|sternum|breastbone)", r"(?:hurts?|hurting|pain|aches?|aching)\b", 2)
    + r"|\belephant\b.{0,40}\bchest\b"
)
CARDIAC_ASSOC = "|".join(
    [
        rf"\b(?:{CANT}|{HARD})\s+(?:\w+\s+)?{BREATH}{NOT_NOSE}",
        r"\bshort(?:ness)? of breath\b",
        r"\bbreathless\w*",
        r"\bout of breath\b",
        r"\bgasping\b",
        r"\bsob\b",
        r"\bsweat\w*",
        r"\bclammy\b",
        r"\bdiaphore\w*",
        r"\bnause\w*",
        r"\bsick to (?:my|his|her|their) stomach\b",
        r"\bthrow(?:ing)? up\b",
        r"\bvomit\w*",
        r"\b(?:going to|gonna) (?:be sick|throw up|puke)\b",
        r"\bdizz\w*",
        r"\blight[- ]?headed\b",
        r"\bfaint\w*",
        r"\bpale\b",
        r"\bgr[ae]y\b",
        r"\bfeel(?:s|ing)? (?:really |very )?sick\b",
        r"\bpass(?:ing)? out\b",
        r"\bheart (?:is )?(?:racing|pounding)\b",
        _near(
            r"\b(?:spread\w*|radiat\w*|going|goes|shoot\w*|mov\w*|travel\w*)", r"(?:arm|jaw|back|shoulder|neck)s?\b", 4
        ),
        _either(r"\b(?:left )?(?:arm|jaw|shoulder)", r"(?:hurts?|pain|numb\w*|tingl\w*|heavy|aches?|aching)\b", 2),
    ]
)
SEVERE_CHEST = (
    _near(r"\b(?:crushing|severe|excruciating|unbearable|intense|terrible|extreme|horrible|worst)", r"chest\b", 5)
    + r"|\bchest (?:pain|pressure|hurts)\b(?:\W+\w+){0,2}?\W+(?:really|so|very|extremely) (?:bad|severe)"
)
HEART_ATTACK_NOW = (
    r"\b(?:having|going through|in the middle of|going into) (?:a |an )?(?:heart attack|"
    r"cardiac arrest)\b"
)

FACE_DROOP = (
    _near(
        r"\b(?:face|mouth|smile|lips?|eyelids?|cheeks?)",
        r"(?:droop\w*|dropp?(?:ed|ing|s)?|sag\w*|"
        r"lopsided|uneven|crooked|slumped|fallen|"
        r"went slack|paraly[sz]\w*)\b",
        4,
    )
    + r"|\b(?:droop\w*|sagg\w*|lopsided|crooked)(?:\W+\w+){0,3}?\W+(?:face|smile|mouth)\b"
    + r"|\bfacial (?:droop|weakness|paraly[sz]is)\b"
    + "|"
    + _near(r"\b(?:face|mouth)", r"(?:isn'?t|is not|not|won'?t|can'?t|stopped) mov\w*", 3)
    + rf"|\b{CANT} smile (?:properly|straight|evenly|right|normally)\b"
    + "|"
    + _near(r"\b(?:face|mouth|lip)", r"hang\w* (?:down|low)", 3)
)
FACE_NUMB = _either(r"\b(?:face|cheek|lips?|mouth)", r"(?:numb\w*|tingl\w*|weak\w*|dead|no feeling)\b", 4)
ONE_SIDE = (
    r"\b(?:one side|one-sided|(?:left|right) side|on the (?:left|right)|half (?:of )?"
    rf"{POSS} (?:face|body)|{ONE_SIDE_LIMB}|one (?:arm|leg))\b"
)
SUDDEN = (
    r"\b(?:sudden(?:ly)?|all of a sudden|out of nowhere|out of the blue|just now|abrupt(?:ly)?|came on (?:fast|"
    r"quickly|suddenly)|(?:started|began) (?:\d+|a few|few|ten|twenty) (?:min|mins|minutes) ago|woke up (?:with|"
    r"and)|an hour ago|was fine (?:an hour|\d+ (?:min|mins|minutes|hours?)) ago)\b"
)
LIMB_WEAK = (
    _either(
        r"\b(?:arm|leg|hand|side|limb|foot)s?",
        r"(?:weak\w*|numb\w*|limp|dead|heavy|paraly[sz]\w*|floppy|"
        r"giving out)\b",
        4,
    )
    + rf"|\b{CANT}\s+(?:lift|move|raise|feel|use|hold up)\s+(?:{POSS}\s+)?(?:(?:left|right)\s+)?(?:arm|leg|"
    rf"hand|side)s?\b" + r"|\bbarely (?:lift|move|raise)\b"
)
SLURRED = (
    r"\bslurr\w*|\b(?:speech|words|talking|speaking|voice)\b(?:\W+\w+){0,4}?\W+(?:slurr\w*|garbled|jumbled|"
    r"muddled|scrambled|not coming out right|gibberish|nonsense|mixed up|all wrong|coming out wrong|"
    r"came out wrong|not making sense)\b|\btalking (?:funny|weird|strange|gibberish|nonsense)\b|\b(?:words|"
    r"speech|talking|sentences)\b(?:\W+\w+){0,2}?\W+(?:make|makes|making) (?:no|any) sense\b|\bwords (?:came|"
    r"come|are coming) out (?:all )?(?:jumbled|wrong|weird)\b"
)
SPEECH_LOSS = (
    rf"\b(?:{CANT}|{HARD})\s+(?:\w+\s+)?(?:speak\w*|talk\w*|get (?:{POSS} )?words out|"
    rf"find (?:{POSS} )?words|"
    r"form words|say (?:\w+ )?words)\b(?!\s+(?:to|about|with|yet|english|much|well))|\blost (?:his|her|my|"
    r"their) speech\b|"
    rf"\b{CANT} understand (?:what|anything|us|me|him|her|words|speech|people)\b"
)
CONFUSED = (
    r"\b(?:confus\w*|disoriented|disorientated|doesn'?t know where (?:she|he|they) (?:is|are)|"
    r"doesn'?t recogni[sz]e|out of it)\b"
)
SUDDEN_BLIND = rf"\b{CANT} see\b(?!\s+(?:well|clearly|far|very|properly|at night|the (?:board|screen|road)))"
VISION_LOSS = (
    rf"\b{CANT}\s+see (?:out of|from|with) (?:one|my|his|her|the) (?:left |right )?eye\b|"
    r"\b(?:lost|losing|loss of) (?:the |all |my |his |her |their |some |most )?(?:vision|sight|eyesight)\b|"
    r"\b(?:vision|sight|eyesight)\b(?:\W+\w+){0,3}?\W+(?:went|gone|going|turned) (?:black|dark|blank|"
    r"gr[ae]y)\b|\bwent blind\b|\bblind in (?:one|my|his|her|the) (?:left |right )?eye\b|"
    rf"\bsudden(?:ly)? (?:\w+ )?(?:blind\w*|double vision|{CANT} see)"
)
THUNDERCLAP = (
    r"\bworst headache\b|\bthunderclap\b|\b(?:sudden|explosive)\W+(?:\w+\W+){0,2}?headache\b|\b(?:terrible|"
    r"severe|excruciating|horrible|massive|splitting|awful|intense|"
    r"blinding) headache\b[^.?!]{0,30}\b(?:sudden\w*|out of nowhere|all of a sudden)|"
    r"\bheadache\b(?:\W+\w+){0,4}?\W+(?:came on|hit|started) (?:suddenly|out of nowhere|like)\b|"
    r"\bheadache\b[^.?!]{0,60}\bworst (?:of (?:my|his|her|their) life|ever|i'?ve ever had)"
)
# a numb or drooping face after dental anaesthetic or from known Bell's palsy is not a new stroke
FACE_EXPLAINED = r"\b(?:dentist|dental|novocaine|numbing|filling|anaesthe\w*|anesthe\w*|botox|bell'?s palsy)\b"
STROKE_NOW = r"\b(?:having|is having|had just had) (?:a |another )?(?:stroke|tia|mini[- ]stroke)\b"

WONT_STOP = (
    r"(?:won'?t|wont|will not|doesn'?t|does not|isn'?t|is not|can'?t|cannot|not) (?:stop\w*|quit\w*|"
    r"slow\w* down|clot\w*|ease up)"
)
BLEED_WONT_STOP = (
    _near(r"\b(?:bleed\w*|blood|nosebleed|nose bleed|cut|wound|gash)", WONT_STOP, 10)
    + rf"|\b{CANT}\s+(?:get (?:it|the bleeding|the blood|\w+) to\s+)?stop (?:the )?(?:bleeding|blood)\b"
    + rf"|\b{WONT_STOP}\s+(?:the\s+)?bleed\w*"
    + r"|\b(?:still|keeps?|non-?stop|nonstop|constantly) (?:bleeding|gushing|pouring)\b"
)
BLEED_SEVERE = (
    _either(
        r"\b(?:blood|bleeding)",
        r"(?:spurt\w*|gush\w*|pour\w*|pump\w*|squirt\w*|everywhere|"
        r"all over)\b",
        3,
    )
    + r"|\b(?:so much|lots of|a lot of|tons of|way too much|a huge amount of|a pool of) blood\b"
    + r"|\bbleeding (?:heavily|profusely|a lot|badly|really bad|so much|everywhere|out|like crazy|like mad|"
    r"through)\b"
    + r"|\bcough\w* up (?:a lot of|lots of|so much|cups? of|mouthfuls? of|handfuls? of) blood\b"
    + r"|\blost a lot of blood\b|\bsoak\w* (?:through )?(?:\w+ ){0,2}(?:towels?|bandages?|pads?|gauze|"
    r"shirt)\b" + r"|\b(?:cut|sliced|severed|nicked|hit) (?:an?|my|his|her|the) artery\b"
)
BLEED_LONG = (
    r"\b(?:bleed\w*|nosebleed)\b(?:\W+\w+){0,3}?\W+for (?:over |more than |about |almost |nearly |"
    r"at least )?(?:an hour|\d+ hours?|hours|(?:[2-9]\d|\d{3}) (?:min|mins|minutes)|half an hour|(?:twenty|"
    r"thirty|forty|fifty) (?:min|mins|minutes))\b"
)
HEAVY_BLEED = r"\bheavy bleeding\b|\bbleeding heavily\b|\b(?:passing|big|large|huge) clots\b"
BLEED_WARNING = (
    r"\b(?:dizz\w*|faint\w*|pass(?:ed|ing)? out|light[- ]?headed|pale|pregnant|after (?:giving )?birth|"
    r"postpartum|gave birth|miscarr\w*)\b"
)
VOMIT_BLOOD = (
    _near(r"\b(?:vomit\w*|throw\w* up|threw up|puk\w*)", r"(?:blood|coffee[- ]grounds?)\b", 7)
    + r"|\bblood in (?:my|his|her|their|the) (?:vomit|sick)\b"
)
# heavy or long periods need a doctor, not an ambulance, unless the bleeding makes someone faint
NOT_ACUTE_BLEED = (
    r"^(?!.*\b(?:dizz\w*|faint\w*|pass(?:ed|ing)? out|every hour|an hour|pale|pregnant)\b).*\b(?:period|"
    r"menstrua\w*|spotting)\b"
)

THROAT = _either(
    r"\bthroat",
    r"(?:clos\w*|swell\w*|swollen|tight\w*|constrict\w*|shut)\b(?!\s+(?:glands?|tonsils?|"
    r"lymph))",
    4,
)
THROAT_INFECTION = r"\b(?:sore throat|strep|tonsil\w*|glands|cold|flu|cough\w*|mono|fever|infection|virus)\b"
TONGUE = _near(r"\btongue", r"(?:swell\w*|swollen|puff\w*|thick\w*|blow\w* up)\b", 5) + r"|\bswollen tongue\b"
LIPS_FACE = _either(r"\b(?:lips?|face|eyes?|mouth)", r"(?:swell\w*|swollen|puff\w*|blow\w* up|balloon\w*)\b", 3)
ALLERGEN = (
    r"\b(?:stung|stings?|bee|wasp|hornet|peanuts?|nuts?|cashews?|shellfish|shrimp|prawns?|allerg\w*|"
    r"new (?:medication|medicine|antibiotic|drug|pill)|penicillin|epi-?pen|hives|anaphyla\w*)\b"
)
BREATH_TROUBLE = "|".join(
    [
        r"\bbreathing\b(?:\W+\w+){0,2}?\W+(?:noisy|fast|rapid|shallow|labou?red|raspy|wheezy|whistling|struggling)\b",
        r"\bnoisy breathing\b",
        r"\bstridor\b",
        rf"\b(?:{CANT}|{HARD})\s+(?:\w+\s+)?{BREATH}{NOT_NOSE}",
        r"\bshort(?:ness)? of breath\b",
        r"\bwheez\w*",
        r"\bgasping\b",
        r"\btrouble breathing\b",
        r"\bbreathing (?:is )?(?:hard|difficult|labou?red)\b",
        rf"\b{CANT} (?:swallow|talk)\b",
    ]
)
ANAPHYLAXIS_NOW = (
    r"\b(?:going into (?:an? )?|having (?:an? )?|in |into )(?:anaphyla\w*|anaphylactic shock|"
    r"severe allergic reaction)\b(?!\s+(?:action|plan|kit|emergency plan|protocol|training))|\b(?:used|"
    r"gave|give|giving|injected|needed) (?:\w+ ){0,2}epi-?pen\b"
)

INGESTED = (
    r"(?:took|taken|swallowed|ate|eaten|downed|popped|had|chugged|drank|drunk|injected|snorted|got into|"
    r"gotten into)"
)
TOO_MUCH = (
    r"(?:too many|too much|way too (?:many|much)|an? (?:whole|full|entire) (?:bottle|pack|packet|box|strip|"
    r"sheet|blister)|the (?:whole|entire|rest of the) (?:bottle|pack|packet|box)|an? (?:bottle|handful|bunch|"
    r"fistful|lot|load) of|a bunch|a handful|all (?:of )?(?:my|his|her|their|the|those|these)|double (?:the|my|"
    r"his|her) dose|(?:several|multiple|many) (?:of )?(?:my |his |her |the )?(?:pills|tablets|doses)|(?:his|"
    r"her|my|their|the|a) (?:whole|entire) (?:\w+'?s? )?(?:supply|bottle|pack|packet|box|prescription|week'?s|"
    r"month'?s)|(?:a |his |her |my |their )?(?:week'?s|month'?s) (?:worth )?(?:of )?(?:pills|meds|medications?|"
    r"tablets|doses|supply)|(?:[89]|[1-9]\d+|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty|"
    r"hundred)\b(?!\s*(?:mg|milligrams?|mcg|micrograms?|g\b|grams?|ml|units?|iu|%|min|mins|minutes|hours?|hrs?|"
    r"years?|days?|weeks?|months?|am|pm|o'?clock|percent|times)))"
)
OVERDOSE_TAKEN = _near(rf"\b{INGESTED}", TOO_MUCH, 2)
OVERDOSED = (
    r"\b(?:overdosed|overdosing|od'?d|od'?ing|o\.d\.'?d)\b|\b(?:took|taken|had|having|has) an? (?:overdose|"
    r"od)\b"
)
POISON_TAKEN = _near(rf"\b(?:{INGESTED}|drinking|eating|swallowing|inhaled|breathed in)", POISONS + r"\b", 4)
CHILD_INGESTED = _near(
    _near(rf"\b{CHILD}\b", rf"{INGESTED}\b", 8),
    _alt(MEDS, POISONS, r"alcohol", r"vodka", r"wine", r"liquor", r"whiske?y", r"rum", r"gin") + r"\b",
    6,
)
CO_ALARM = (
    r"\b(?:carbon monoxide|co) (?:alarm|detector)s?\b[^.?!]{0,40}\b(?:going off|went off|beeping|goes off)\b|"
    r"\b(?:breathed in|inhaled|exposed to) (?:\w+ ){0,2}(?:carbon monoxide|fumes|gas)\b"
)

NOT_BREATHING = (
    r"\b(?:not|isn'?t|is not|wasn'?t|aren'?t|stopped|stops|has stopped|no longer|quit|barely|"
    r"isnt) breath\w*|\bno (?:breathing|breath|pulse|heartbeat|heart beat)\b|\b(?:doesn'?t|does not|"
    r"don'?t) have (?:a )?pulse\b|"
    rf"\b{CANT} (?:find|feel) (?:a|any|his|her|their) (?:pulse|heartbeat)\b|"
    r"\bdon'?t think (?:he|she|they|the baby|it)(?:'s| is| are|'re) breathing\b|\b(?:not sure|don'?t know|"
    r"can'?t tell) if (?:he|she|they|the baby)(?:'s| is| are|'re) (?:still )?breathing\b"
)
CANT_BREATHE = (
    rf"\b(?:{CANT}|can (?:barely|hardly))\s+(?:really |even |properly )?{BREATH}{NOT_NOSE}|\bgasping\b|"
    r"\b(?:turning|turned|going|gone) (?:\w+ )?blue\b|\blips (?:are |look |turned |turning |"
    r"have gone )?(?:blue|purple|gr[ae]y)\b|\bbarely breathing\b"
)
SEVERE_ASTHMA = (
    r"\b(?:severe|bad|really bad|terrible|serious|major) asthma attack\b|\b(?:inhaler|nebuli[sz]er|"
    r"puffer)s?\b(?:\W+\w+){0,2}?\W+(?:isn'?t|is not|not|doesn'?t|didn'?t|won'?t|no longer|"
    r"aren'?t) (?:working|helping|work|help)\b"
)
UNRESPONSIVE = (
    r"\bunresponsive\b|\bunconscious\b(?! bias)|\b(?:not|isn'?t|is not|wasn'?t|not really) (?:responding|"
    r"responsive|waking up|conscious)\b|"
    rf"\b(?:{CANT}|won'?t) (?:wake|rouse) {THEM} up\b|\b(?:won'?t|will not|can'?t) wake up\b"
    r"(?!\s+(?:for|in the|early|on time|before))|\bhasn'?t (?:woken|woke|come round|come to)\b|"
    r"\bpassed out and (?:won'?t|can'?t|isn'?t|is not|not)\b|\b(?:won'?t|will not|doesn'?t|does not|isn'?t|"
    r"is not|not|can'?t|hasn'?t) respond\w*|\bnot (?:awake|waking|coming round|come round|coming to)\b"
)
TRAUMA = (
    r"\b(?:fell|fallen|falling|fall|crash\w*|hit by|knocked (?:down|over|out)|hit (?:his|her|their|my) head|"
    r"accident|electrocuted|drowned|pulled (?:\w+ ){0,3}out of)\b"
)
NOT_MOVING = r"\b(?:isn'?t|is not|not|won'?t|stopped|hasn'?t been|doesn'?t seem to be) moving\b|\blimp\b"
KNOCKED_OUT = r"\b(?:passed out|unconscious|unresponsive|collapsed|won'?t wake|can'?t wake|not waking)\b"
FOUND_WITH_PILLS = (
    KNOCKED_OUT + r"[^.?!]{0,40}\b(?:pills|empty (?:pill )?bottles?|pill bottles?|needles?|syringes?|"
    r"tablets|blister packs?)\b|\b(?:pills|empty (?:pill )?bottles?|pill bottles?|"
    r"needles?|syringes?)\b[^.?!]{0,40}" + KNOCKED_OUT
)
ABNORMAL_BREATHING = (
    r"\bbreath(?:ing|s)?\b(?:\W+\w+){0,3}?\W+(?:very |really )?(?:slow|shallow|irregular|weird|"
    r"strange|funny|gurgling|rattling|snoring|noisy)\b|\bgurgl\w*|\bagonal\b"
)
LIMP = (
    r"\b(?:he|she|they|baby|child|son|daughter|toddler|infant|kid|husband|wife|mum|mom|dad)(?:'s| is| are| went|"
    r" has gone| seems| looks)\s+(?:\w+\s+)?(?:all )?(?:limp|floppy)\b"
)
DROWNING = (
    r"\b(?:is|'s|are|was|nearly|almost) drown\w*\b(?!\s+in (?:work|debt|paperwork|emails?|stress|homework|"
    r"bills))|\bpulled (?:\w+ ){0,3}out of the (?:pool|water|lake|river|sea|ocean|bath)\b"
)
COLLAPSED = (
    r"\bcollapsed\b(?! lung)|\b(?:doing|giving|started|starting|performing) (?:cpr|chest compressions|"
    r"compressions)\b"
)
CHOKING = (
    r"\bchoking\b(?! (?:hazards?|risk|game))|"
    rf"\bsomething (?:is )?stuck in (?:{POSS}|the baby'?s) (?:throat|windpipe|airway)\b"
)

SEIZING = (
    r"\bhaving (?:a |an )?(?:seizure|fit|convulsion|epileptic fit|grand mal)s?\b|\bseizing\b|\bconvuls\w*|"
    r"\b(?:is|'s|are|started|keeps|been) fitting\b|\bin (?:a )?(?:seizure|status epilepticus)\b|\b(?:shaking|"
    r"jerking|twitching) (?:all over|uncontrollably|violently)\b|\beyes? (?:are |is )?roll(?:ed|ing) back\b"
)
FIRST_SEIZURE = (
    r"\bfirst (?:ever )?(?:seizure|fit|convulsion)s?\b|\b(?:seizure|fit|"
    r"convulsion)s? for the first time\b|\b(?:seizure|fit|convulsion)s?\b[^.?!]{0,60}\bnever had (?:one|"
    r"a seizure|a fit|seizures|a convulsion)(?: before)?\b"
)
LONG_SEIZURE = (
    _near(
        r"\b(?:seiz\w*|fit|convuls\w*|shaking|epilep\w*)",
        r"(?:for|over|more than|longer than|past|been|"
        r"lasting|lasted)\s+(?:\w+\s+)?(?:[5-9]|"
        r"\d{2,}|five|six|seven|eight|nine|ten|"
        r"fifteen|twenty|thirty)\s*(?:min|mins|"
        r"minutes)\b",
        8,
    )
    + "|"
    + _near(r"\b(?:seizure|fit|convulsion)s?", WONT_STOP, 4)
    + r"|\b(?:won'?t|wont) stop (?:seizing|shaking|convulsing|fitting|jerking)\b"
)
REPEATED_SEIZURE = (
    r"\bhaving (?:another|a second|a third|more|multiple|repeated|several) (?:seizure|fit|convulsion|"
    r"one)s?\b|\b(?:seizure|fit)s?\b(?:\W+\w+){0,3}?\W+(?:back[- ]to[- ]back|in a row|"
    r"one after (?:another|the other))|\bkeeps? having (?:seizure|fit)s\b|\b(?:two|three|four|five|"
    r"several|multiple|[2-9]) (?:seizures|fits|convulsions) (?:in|within) (?:the )?(?:last|past|an?|"
    r"one|few) (?:\w+ )?(?:hours?|minutes|mins)\b|\bhasn'?t (?:woken|woke|come round|"
    r"come to) (?:up )?(?:in )?between\b"
)

# -- other red flags (and the atypical heart attack)
JAW_OR_ARM = (
    r"\b(?:jaw|left arm|arm|shoulder)s?\b(?:\W+\w+){0,2}?\W+(?:aches?|aching|hurts?|pain|heavy|numb)\b|"
    r"\bjaw (?:pain|ache)\b"
)
BREATHLESS = (
    rf"\bshort(?:ness)? of breath\b|\bbreathless\w*|\bout of breath\b|\b(?:{CANT}|"
    rf"{HARD})\s+(?:\w+\s+)?{BREATH}"
)
NAUSEA_SWEAT = r"\bnause\w*|\bsweat\w*|\bclammy\b|\bthrow(?:ing)? up\b|\bvomit\w*|\bfaint\w*|\blight[- ]?headed\b"
HEAD_INJURY = (
    r"\b(?:hit|banged|bumped|smacked|knocked) (?:his|her|my|their|the back of (?:his|her|my|their)) head\b|"
    r"\bhead (?:injury|trauma|wound)\b|\bfell (?:on|onto) (?:his|her|my|their) head\b|\bconcussion\b"
)
HEAD_RED_FLAG = (
    r"\b(?:vomit\w*|throw\w* up|threw up|confus\w*|unconscious|knocked out|passed out|seizure|won'?t wake|"
    r"drowsy|slurr\w*|can'?t remember|clear fluid|unequal pupils)\b"
)
MENINGITIS = (
    r"\brash\b[^.?!]{0,40}\b(?:doesn'?t|does not|won'?t|didn'?t) (?:fade|go away when)|\bnon-?blanching\b|"
    r"\bpurple (?:rash|spots)\b[^.?!]{0,60}\b(?:fever|stiff neck|glass)\b|"
    r"\bstiff neck\b[^.?!]{0,60}\b(?:rash|confus\w*|light hurts)\b"
)
DKA = (
    r"\b(?:diabetic|diabetes|type 1)\b[^.?!]{0,80}\b(?:fruity|breathing (?:fast|hard|deep)|rapid breathing|"
    r"ketones? (?:high|are high)|can'?t stop vomiting|vomiting all day)\b"
)
HEAT_STROKE = (
    r"\b(?:heat|sun|hot day|yard work|outside)\b[^.?!]{0,60}\b(?:confus\w*|passed out|"
    r"collapsed)\b[^.?!]{0,60}\b(?:stopped sweating|not sweating|hot (?:and )?dry|skin is (?:hot|"
    r"burning))\b|\b(?:stopped sweating|not sweating)\b[^.?!]{0,40}\bconfus\w*"
)
HYPOTHERMIA = (
    r"\b(?:cold|freezing|snow|outside|hypotherm\w*)\b[^.?!]{0,60}\b(?:mumbling|slurr\w*|confus\w*|clumsy|"
    r"stopped shivering|barely conscious)\b"
)
OPEN_FRACTURE = r"\bbone\b[^.?!]{0,15}\b(?:poking|sticking|coming|is) (?:out|through)\b|\bthrough the skin\b"
SNAKEBITE = r"\b(?:bitten|bit) by (?:a |an )?(?:\w+ )?snake\b|\bsnake ?bite\b|\bsnake (?:bit|just bit)\b"
SCALD = (
    r"\b(?:pulled|spilled|poured|tipped|knocked)\b[^.?!]{0,30}\b(?:boiling|scalding) (?:water|oil|tea|coffee)\b|"
    r"\b(?:big|large|huge|severe|deep|third[- ]degree) burns? (?:on|over|across|covering)\b|\bburns? (?:all over|"
    r"covering)\b"
)
TORSION = r"\bsudden\w*\b[^.?!]{0,30}\bpain\b[^.?!]{0,20}\b(?:testic\w+|scrotum|balls)\b"
RIGID_ABDOMEN = r"\b(?:stomach|belly|abdomen|tummy)\b[^.?!]{0,20}\b(?:hard as a (?:board|rock)|rigid|board-?like)\b"

# -- crisis vocabularies
MYSELF = r"(?:my ?self)"
WANT = (
    r"(?:want|wants|wanna|wanted|going|gonna|plan|plans|planning|intend\w*|ready|decided|about to|tempted|trying|"
    r"try|tried|urge|urges|thinking|thought|think|considering|contemplating|fantasi[sz]\w*|dream\w*|wish\w*|need|"
    r"might|will|'ll|afraid i'?ll|scared i'?ll|feel like|imagin\w*|picture|picturing|obsess\w*)"
)
# small words between the verb and its object: "I feel like I should just disappear forever"
FILLER = (
    r"(?:(?:i|i'?ll|i'?d|i should|should|just|really|seriously|to|of|about|on|that|like|kinda|probably|honestly|"
    r"is|actually|maybe|finally)\s+){0,4}"
)
SELF_KILL = (
    rf"(?:kill(?:ing)? {MYSELF}|kms|end(?:ing)? (?:my (?:own )?life|it all|things|everything|it|my suffering|"
    rf"this)"
    r"(?!\s+(?:with|between|for good with))|take (?:my (?:own )?)?life|taking my (?:own )?life|"
    r"commit(?:ting)? suicide|suicide|not (?:be here|be around|exist|wake up|be alive)|stop existing|"
    r"cease to exist|stop living|stop being alive|(?:go to )?sleep forever|(?:ways|how|methods?) to (?:die|"
    r"end it|kill myself|end my life)|jump(?:ing)? (?:off|from|in front of)|jump(?:ing)?(?=\s*(?:$|[.!,;]|"
    r"tonight|today|tomorrow|now))|disappear (?:for good|forever|permanently)|hang(?:ing)? myself|"
    r"shoot(?:ing)? myself|overdos(?:e|ing)(?! on (?:vitamin|water|caffeine))|slit(?:ting)? my wrists?|"
    r"blow my brains out|drive (?:my car )?(?:into|off) (?:a |the )?(?:tree|wall|river|lake|bridge|traffic|"
    r"oncoming|truck|pole|cliff)|step(?:ping)? in front of)"
)
# a plan to swallow a whole supply; "I want to take all my pills in the morning instead" is a schedule question
PILL_PLAN = (
    rf"\b{WANT}\s+{FILLER}(?:take|taking|swallow\w*) (?:them |it )?(?:all|every(?:one| one)?|the rest|"
    rf"a (?:whole )?bottle|"
    r"a handful) (?:of )?(?:my|the|these|those)? ?(?:pills|meds|medications?|tablets|sleeping pills)?|"
    r"\b(?:plan|going|gonna|will|want|intend)\w*\b[^.?!]{0,20}\b(?:take|swallow)\w* (?:them |"
    r"it )?all (?:of )?(?:my |the )?(?:pills|tablets|meds|medications?)?\s*(?:at once|together|in one go)\b"
)
DOSING_SCHEDULE = (
    r"\b(?:morning|evening|breakfast|lunch|dinner|instead|schedule|spread|routine|once a day|daily|"
    r"is (?:that|it) (?:ok|okay|safe|fine)|with food|doctor said)\b"
)
SUICIDAL_WANT = (
    rf"\b{WANT}\s+{FILLER}{SELF_KILL}\b"
    r"|\b(?:want|wants|wanted|wanna|wish|wishing|ready|deserve|hope)\s+(?:to\s+)?(?:just\s+)?(?:die|"
    r"be dead)\b(?!\s+(?:of|from) (?:embarrassment|laughter|boredom|shame|cringe))|\bkms\b"
)
THOUGHTS_OF = rf"\bthoughts? (?:of|about) {FILLER}{SELF_KILL}\b"
SHOULD_DIE = (
    r"\bi (?:should|might as well|may as well|need to|deserve to|ought to) (?:just )?(?:die|be dead|"
    r"not exist|end it|not be here)\b"
)
SUICIDAL_STATE = (
    r"\b(?:i'?m|i am|im|feel(?:ing)?|felt|been|being|get|getting|am|was|is|are|'s|seems?|"
    r"sounds?)\s+(?:(?!not\b|never\b)\w+\s+)?suicidal\b|\bsuicidal (?:thoughts|ideation|feelings|"
    r"urges)\b|\bthoughts (?:of|about) (?:suicide|killing myself|ending (?:my life|it)|dying|death|"
    r"not being here)\b"
)
SUICIDAL_PASSIVE = "|".join(
    [  # noqa: FLY002 (one alternative per entry)
        (
            r"\b(?:no|zero|not (?:a|any|one)|nothing|what'?s the|whats the|lost (?:all |any |my |the )?)\s*(?:reason|point|"
            r"purpose|will|desire)\w*\s+(?:(?:to|in|for|of)\s+)?(?:me\s+)?(?:to\s+)?(?:live|living|go(?:ing)? on|"
            r"be(?:ing)? alive|be(?:ing)? here|keep(?:ing)? going|carry(?:ing)? on|stay(?:ing)? alive|exist(?:ing)?)\b"
        ),
        r"\bnothing (?:left )?to live for\b",
        r"\blife (?:is(?:n'?t| not)|isnt|ain'?t) worth (?:living|it)\b",
        r"\bnot worth living\b",
        (
            r"\b(?:better off|better|happier|easier|relieved|glad)\b(?:\W+\w+){0,4}?\W+(?:without me|if i (?:just )?(?:was|"
            r"were|wasn'?t|weren'?t|was not|were not) (?:dead|gone|here|around|alive|born)|if i (?:just )?(?:died|disappeared|"
            r"was gone|were gone|wasn'?t here|weren'?t here|wasn'?t around|weren'?t around|didn'?t wake up|never woke up)|"
            r"with me (?:dead|gone))\b"
        ),
        (
            r"\b(?:i'?m|i am|im|i'?ve been|i keep|i have|i'?ve got|been) (?:having |getting )?(?:really |very |some |"
            r"these )?dark thoughts\b"
        ),
        (
            r"\bgoodbye\b[^.?!]{0,80}\b(?:isn'?t|is not|not|won'?t|stopped) (?:answering|responding|picking up|replying)\b|"
            r"\bthank you for everything\W+(?:\w+\W+){0,2}?goodbye\b"
        ),
        r"\b(?:i'?d|i would) (?:rather|sooner) (?:be dead|die|not be alive|not exist|not be here)\b(?!\s+than)",
        r"\bdon'?t see (?:the|any) point (?:in|of) (?:living|life|going on|being alive|anything)\b",
        r"\b(?:want|need) out of (?:this|my) life\b",
        r"\b(?:made|making|tied|tying|bought|have|got|set up) (?:a |the )?noose\b",
        (
            r"\b(?:letters?|notes?|messages?|videos?)\b[^.?!]{0,40}\b(?:say(?:ing)? goodbye|"
            r"farewell)\b[^.?!]{0,30}\bbefore i (?:go|die|leave|do it)\b|\bsay(?:ing)? (?:my )?goodbyes? to (?:everyone|"
            r"my (?:family|kids|children|friends|loved ones))\b(?! before (?:my|our|the) (?:trip|move|flight|surgery))"
        ),
        r"\bwish(?:ed)? i (?:was|were|'d|had) (?:dead|never been born|not alive|gone)\b",
        r"\bwish(?:ed)? i (?:wasn'?t|weren'?t|was not|were not) (?:alive|born|around|here anymore)\b",
        r"\bwish i (?:didn'?t|did not) exist\b",
        (
            r"\bwish i (?:could|would|didn'?t|did not|wouldn'?t) (?:just )?(?:die|disappear forever|not wake up|never wake up|"
            r"sleep forever|stop existing|exist)\b"
        ),
        r"\b(?:go to sleep|sleep) and (?:never|not) wake up\b",
        (
            r"\bdon'?t (?:want|wanna) (?:to )?(?:be alive|exist|keep (?:living|going)|wake up(?: tomorrow| again)?\b(?! early)|"
            r"live(?=\s*(?:$|[.,!;]|anymore|any more|any longer|like this))|be here (?:anymore|any more|any longer))"
        ),
        r"\bnot sure i (?:want|wanna) to (?:keep living|live|go on|be alive|be here)\b",
        r"\bdone with (?:life|living|being alive|everything|it all)\b",
        r"\b(?:giving|gave|give) (?:away )?(?:my|all my) (?:stuff|things|belongings|possessions)(?: away)?\b",
        r"\b(?:wrote|writing|written|write|left) (?:a |my )?(?:suicide note|goodbye (?:letters?|notes?|messages?))\b",
        (
            r"\b(?:stockpil\w*|hoard\w*|saving up|saved up|sav(?:e|ing)|collect\w*|stash\w*)\s+(?:\w+\s+){0,2}(?:pills|meds|"
            r"tablets|medications?)\b(?:[^.?!]{0,40}\b(?:all at once|at once|to (?:take|swallow) (?:them )?all|to end|so i can|"
            r"for when))"
        ),
        r"\b(?:stockpil\w*|hoard\w*)\s+(?:\w+\s+){0,2}(?:pills|meds|tablets|medications?)\b",
        (
            r"\b(?:bought|got|have|saved|collected|ordered)\s+(?:\w+\s+){0,2}?(?:rope|gun|pills|tablets|meds|razors?|"
            r"blades?)\s+(?:to|so i can|for when i|for)\s+(?:\w+\s+)?(?:overdose|od|kill myself|end (?:it|my life|things)|die|"
            r"hang myself|do it)\b|\b(?:bought|got) (?:a |some )?(?:rope|gun) (?:to|so i can)\b"
        ),
        (
            r"\b(?:there'?s |there is |i see |see )?no point (?:anymore|any more|in (?:anything|living|life|going on|"
            r"being alive|trying anymore))\b"
        ),
        (
            r"\b(?:can'?t|cannot|can not) (?:keep (?:on )?living|go on living|go on (?:anymore|any more|like this)|"
            r"live like this|keep going like this)\b"
        ),
        r"\b(?:pills|meds|tablets|medications?)\b(?:\W+\w+){0,2}?\W+(?:lined up|counted out|all ready|ready to take)\b",
        (
            r"\b(?:suicide|dying|death|ending it|killing myself)\b[^.?!]{0,40}\b(?:only|best|easiest|last) (?:way out|option|"
            r"answer|solution|escape|choice)\b"
        ),
        r"\bbetter off dead\b",
        (
            r"\b(?:nobody|no one|no-one|noone)(?: would| will|'?d)? (?:even )?(?:care|notice|miss me|cry|"
            r"be sad)\b[^.?!]{0,25}?\bif i (?:died|was gone|were gone|disappeared|killed myself|wasn'?t here|weren'?t here|"
            r"was dead|were dead)\b"
        ),
        r"\b(?:nobody|no one|no-one|noone) (?:would|will) (?:even )?miss me\b",
        r"\bnot wanting to (?:be here|be alive|live|exist|wake up)\b",
        r"\btired of (?:living|life|being alive|existing)\b",
        r"\bwant (?:it all|everything|my life|this life|all of it) to (?:end|stop|be over)\b",
        r"\b(?:life|living|alive)\b[^.?!]{0,40}\bwant (?:it|this|everything|it all) (?:all )?to (?:end|stop|be over)\b",
        r"\bmy (?:own )?suicide\b",
        (
            r"\b(?:saying|said|says|texted|sent|wrote)\b[^.?!]{0,30}\bgoodbye (?:forever|for good|for the last time)\b|"
            r"\b(?:final|last) goodbye\b"
        ),
        (
            r"\b(?:use|using|turn|turning|point|pointing)\s+(?:it|them|a gun|the gun|my gun|a knife|the knife|"
            r"the pills)\s+(?:on|against) (?:myself|my head|my wrists?|my throat)\b"
        ),
    ]
)
# hopelessness with "what's the point" left hanging
HOPELESS = r"\b(?:hopeless|no hope|nothing will (?:ever )?(?:get|be) better|never get better|worthless|no future)\b"
BARE_POINT = r"\bwhat'?s the point\b(?!\s+(?:of|in)\s+(?!living|life|being alive|going on|anything|trying|it all))"
# dwelling on death; fear of dying (health anxiety) is a different conversation, see DEATH_FEAR
DWELL_ON_DEATH = (
    r"\b(?:can'?t stop|keep|kept|always|constantly|been|obsess\w*|fixat\w*|preoccupied)\s+(?:think\w*|"
    r"dream\w*|fantasi[sz]\w*|obsess\w*)?\s*(?:about|of|over|with) (?:dying|death|suicide|killing myself|"
    r"ending it|ending my life|not being (?:here|alive)|being dead)\b"
)
DEATH_FEAR = r"\b(?:afraid|scared|fear\w*|anxious|anxiety|worried|worry|terrified|panic\w*)\b"
# a first-person mention of killing oneself is a crisis whatever verb carries it ("imagining", "I'd")
SELF_KILL_MENTION = (
    rf"\b(?:kill(?:ing)?|killed) {MYSELF}\b(?!\s+(?:laughing|trying|to get|to make|at (?:the )?(?:gym|"
    rf"work)|"
    r"with work|working|over (?:this|it)|studying|for (?:this|that|a|the)))|"
    r"\bend(?:ing)? my (?:own )?life\b|\btak(?:e|ing) my (?:own )?life\b|\bcommit(?:ting)? suicide\b|"
    r"\bunalive (?:myself|me)\b|\bsewer ?slide\b|\bhang(?:ing)? myself\b|"
    r"\bshoot(?:ing)? myself\b(?! in the foot)"
)
FIRST_PERSON_LETHAL = (
    r"\b(?:how (?:many|much)|what (?:dose|amount))\b[^.?!]{0,60}\b(?:i|me|myself|"
    r"my)\b[^.?!]{0,40}\b(?:to|would|will|could)\s+(?:not wake up|never wake up|die|be fatal|"
    r"kill me|end (?:it|my life)|be lethal|overdose|od)\b|\bfor me to (?:die|not wake up|"
    r"overdose)\b|\b(?:painless|easiest|quickest|best|peaceful|surest) (?:way|method) to (?:die|"
    r"kill myself|end my life|end it|commit suicide)\b|\bhow (?:can|do|should|could|"
    r"would) i (?:overdose|od|kill myself|end my life|end it all)\b(?!\s+(?:my|his|her|a|the|"
    r"someone|somebody|him|them)\b)"
)
THIRD_SUICIDAL = (
    r"\b(?:kill(?:ing)?|end(?:ing)?|hang(?:ing)?|shoot(?:ing)?) (?:him|her|them)sel(?:f|ves)\b|"
    r"\bend(?:ing)? (?:his|her|their) (?:own )?life\b|\b(?:he|she|they)(?:'d|"
    r" would) be better off dead\b|\b(?:he|she|they|my \w+)\b(?:\W+\w+){0,3}?\W+(?:wants?|wanting|wanna|"
    r"planning|plans?|threaten\w*|talk\w* about|keeps? saying|says|said|told me|texted|"
    r"posted)\b(?:\W+\w+){0,3}?\W+(?:die|dying|suicide|be dead|not (?:be here|be alive|wake up))\b"
)
SELF_HARM_INTENT = (
    rf"\b(?:{WANT}|thoughts? of|thinking of|urges? to|need to)\s+(?:to\s+|of\s+|about\s+)?(?:cut|"
    rf"cutting|burn|burning|hurt|hurting|harm|harming|hit|hitting|starve|starving|punish|"
    rf"punishing)\s+{MYSELF}"
    r"|\burges? to (?:cut|self[- ]?harm|burn)\b"
)
ACCIDENTAL = (
    r"(?!\s+(?:on(?! purpose)|at|in|while|playing|during|when|by|falling|with (?:a|the)|lifting|running|"
    r"shaving|cooking|chopping|accidentally|by accident))"
)
# an injury mention plus a sign it was deliberate or keeps happening, anywhere in the sentence
SELF_INJURY = (
    rf"\b(?:cut|cutting|burn\w*|hurt\w*|harm\w*|hit|hitting|scratch\w*|punch\w*|bit|bite|biting) {MYSELF}\b"
    + ACCIDENTAL
)
DELIBERATE = (
    r"\b(?:again|on purpose|deliberately|intentionally|to cope|to feel|to punish|every (?:day|night)|"
    r"whenever|than usual|as usual|like always|urges?|want to do it|can'?t stop|keep doing|addicted)\b"
)
ACCIDENT_CONTEXT = (
    r"\b(?:playing|football|soccer|rugby|gym|running|lifting|cooking|shaving|chopping|fell|fall|"
    r"tripped|accident\w*|sports?|at work|kitchen|stove|oven)\b"
)
SELF_HARM_ACTS = (
    rf"\b(?:been|started|start|keep|kept|still|i|i'?ve|again|am|i'?m|im)\s+(?:\w+\s+)?(?:cutting|burning|"
    rf"hurting|harming|scratching|hitting|punching|starving|carving into)\s+(?:{MYSELF}|my (?:arms?|"
    rf"wrists?|legs?|thighs?|"
    r"skin|stomach|hips?))\b"
    rf"|\b(?:cut|burn\w*|hurt|harm\w*|hit|scratch\w*)\s+{MYSELF}\b(?:\W+\w+){{0,3}}?\W+(?:on purpose|"
    rf"deliberately|"
    r"intentionally|to (?:feel|cope|punish|calm))|\b(?:been|started|keep|kept|i'?ve been|am|i'?m|"
    r"im) cutting(?:\s+(?:again|myself)|\s*(?:[.,!?;]|$)|\s+(?:and|since|for (?:a|\d+|years?|months?|"
    r"weeks?)|to cope|when|whenever))|\bself[- ]?harm\w*|\bself[- ]?injur\w*|\bcutting (?:again|"
    r"myself)\b|\b(?:cut|cutting|slit|slitting|slash\w*) (?:my|his|her|their) wrists?\b"
    rf"|\b(?:cut|burn\w*|hurt|harm\w*|hit|scratch\w*|"
    rf"punch\w*)\s+{MYSELF}\b{ACCIDENTAL}(?:\W+\w+){{0,4}}?\W+"
    r"(?:again|every (?:day|night)|to cope|when i'?m (?:upset|sad|angry|stressed|overwhelmed)|"
    r"whenever)\b|\b(?:on purpose|deliberately|intentionally)\b(?:\W+\w+){0,2}?\W+(?:cut|burn\w*|hurt|"
    r"scratch\w*)\b|\b(?:scratch\w*|cut\w*|burn\w*|pick\w*) (?:my|her|his) (?:arms?|skin|legs?) (?:until|"
    r"till|til) (?:they|it|i) (?:bleed|bled|burn)\w*"
)
SELF_HARM_TOOL = (
    r"\b(?:scratch\w*|cut\w*|slash\w*|carv\w*|burn\w*|slic\w*)\b(?:\W+\w+){0,2}?\W+(?:my|his|her|"
    r"their) (?:wrists?|arms?|thighs?|legs?|skin|stomach)\b(?:\W+\w+){0,3}?\W+(?:razor|blade|knife|"
    r"lighter|cigarettes?|scissors|glass|compass)" + r"|\bwrists?\b[^.?!]{0,30}\b(?:razor|blade|knife)"
)
THIRD_SELF_HARM = (
    r"\b(?:cut(?:s|ting)?|burn(?:s|ing)?|hurt(?:s|ing)?|harm(?:s|ing)?|scratch(?:es|ing)?|starv(?:es|"
    r"ing)|hit(?:s|ting)?) (?:(?:him|her|them)sel(?:f|ves)|(?:his|her|their) (?:arms?|wrists?|legs?|"
    r"thighs?|skin))\b" + ACCIDENTAL
)

# -- requests for help with harm
LETHAL_WORDS = (
    r"(?:kill|kills|killed|die|be (?:lethal|fatal|deadly)|lethal|fatal|deadly|cause death|end (?:a|his|her|"
    r"their|someone'?s) life|stop (?:a|his|her|their|someone'?s|the) heart|stop (?:a|his|her|their|"
    r"someone'?s) breathing|(?:to|would|will|could) (?:od|o\.d\.|overdose)(?! on (?:vitamin|water))|"
    r"not wake up|never wake up)"
)
QTY_Q = (
    r"\b(?:how (?:many|much)(?! (?:people|deaths|americans|patients|cases|children|kids|adults|men|women|times|"
    r"years|percent|of the population))|what (?:amount|dose|dosage|quantity|number|level)|which (?:dose|amount)|"
    r"what(?:'s| is) the (?:\w+ )?(?:amount|dose|number|quantity|level)|(?:minimum|smallest|least|lowest|"
    r"min) (?:amount|dose|dosage|number|quantity)|at what (?:point|dose|amount|level|quantity))\b"
)
LETHAL_QTY = rf"{QTY_Q}[^.?!]{{0,80}}?\b{LETHAL_WORDS}\b"
LETHAL_DOSE = (
    r"\b(?:lethal|fatal|deadly|killing|deadliest)\s+(?:\w+\s+)?(?:dose|doses|dosage|amount|quantity|level|"
    r"overdose|combination|mix|cocktail)\b|\bld ?50\b"
)
IS_QTY_LETHAL = (
    r"\b(?:is|are|would|will|could|can|does)\s+(?:\d+|\w+ty|ten|a (?:whole )?bottle|a handful|that many|"
    r"this much|that much)\b[^.?!]{0,60}?\b(?:enough to |going to |gonna )?(?:kill|be (?:lethal|fatal|"
    r"deadly)|lethal|fatal|deadly)\b|\benough (?:\w+ ){0,2}to (?:kill|be (?:lethal|fatal)|cause death|od|"
    r"overdose)\b"
)
# "which drugs are deadly with alcohol?" asks about a danger to avoid
MIXING_RISK = r"\b(?:mix\w*|combin\w*|taken|take|together|interact\w*)\b[^.?!]{0,30}\bwith\b|\bwith alcohol\b"
WHICH_LETHAL = (
    r"\b(?:which|what|list|name|tell me|give me)\s+(?:\w+\s+){0,4}?(?:drugs?|pills?|medications?|meds|"
    r"medicines?|substances?|poisons?|chemicals?|combination|mix)\b[^.?!]{0,40}?\b(?:(?:most|more|"
    r"the most) (?:lethal|deadly|fatal)|(?:would|could|will) (?:be )?(?:kill|lethal|deadly|fatal)\w*|"
    r"causes? (?:a )?(?:quick |fast |painless )?death|kills? (?:quickly|fast|instantly|painlessly|"
    r"reliably)|(?:lethal|deadly|fatal) in (?:small|tiny|low) (?:doses|amounts)|(?:lethal|deadly|"
    r"fatal) (?:to|for) (?:someone|a person|somebody|him|her|them|my \w+))"
)
HARM_VERB = (
    r"(?:poison|poisoning|drug|drugging|spike|spiking|roofie|sedate|sedating|knock (?:\w+ )?out|incapacitate|"
    r"overdose|od|kill|killing|murder|hurt|harm|strangle|suffocate|smother)"
)
HARM_FRAME = (
    r"(?:how (?:to|do i|can i|could i|would i|should i|would you|do you|can you|might i|would one|does one|"
    r"can someone|would someone)|ways? to|best way to|easiest way to|quickest way to|safest way to|help me|"
    r"teach me (?:how )?to|tell me how to|give me (?:a way|ways|a method) to|is there a way to|(?:what|"
    r"which)\s+(?:\w+\s+){0,3}?(?:can|could|should|would|will|do) (?:i|you|one|someone) (?:use|give|buy|"
    r"get) to|"
    rf"{I_WILL} to)"
)
HARM_OTHERS = (
    rf"\b{HARM_FRAME}\s+(?:\w+\s+){{0,3}}?{HARM_VERB}\s+(?:\w+\s+){{0,1}}?{PERSON_OBJ}|"
    rf"\b{HARM_FRAME}\b[^.?!]{{0,60}}?\bto (?:hurt|harm|kill|poison|injure|sicken) (?:him|her|them|someone|"
    r"somebody|my \w+|a person)\b"
    rf"|\b{HARM_FRAME}\s+(?:\w+\s+){{0,2}}?make\s+{PERSON_OBJ}\s+(?:really |very |so |violently )?"
    r"(?:sick|ill|vomit|pass out|unconscious|throw up)"
    rf"|\b{HARM_FRAME}\s+(?:\w+\s+){{0,2}}?give\s+{PERSON_OBJ}\s+(?:an overdose|a lethal (?:dose|amount)|"
    rf"a fatal dose|"
    r"too (?:much|many)|poison|something to (?:kill|knock))"
)
COVERT = (
    r"\bwithout (?:him|her|them|my \w+|anyone|anybody|somebody|someone|the \w+) (?:knowing|noticing|finding out|"
    r"tasting|realizing|realising|suspecting|consent\w*)|\bwithout (?:his|her|their) (?:consent|knowledge)\b|"
    r"\b(?:undetectable|untraceable|tasteless|odou?rless|colou?rless|can'?t be (?:traced|detected|tasted)|"
    r"won'?t (?:show up|be detected|taste)|doesn'?t show up|not show up)\b|\blooks? (?:natural|"
    r"like (?:an accident|natural causes|a heart attack|suicide|an overdose))\b|\b(?:hard|harder|difficult|"
    r"impossible) to (?:detect|trace|find in)\b"
)
COVERT_HARM = (
    rf"\b(?:{HARM_VERB}|poisons?|make (?:\w+ ){{0,2}}(?:sick|ill)|sick|lethal|deadly|death|dies?|dead|"
    rf"murder)\b"
)
COVERT_DOSING = (
    r"\b(?:secretly|covertly|on the sly|behind (?:his|her|their) back|without (?:him|her|them|"
    r"my \w+) (?:knowing|noticing)|without (?:his|her|their) (?:consent|knowledge))\b"
)
GIVE_DRUG = (
    r"\b(?:give|giving|slip|slipping|put|putting|add|adding|dose|dosing|feed|"
    r"feeding)\b[^.?!]{0,30}\b(?:laxatives?|sedatives?|drugs?|pills|medications?|meds|poison|sleeping pills|"
    r"eye ?drops|visine|xanax|benadryl)\b"
)
CAUSE_EVENT = (
    r"\b(?:cause|induce|trigger|give|bring on)\w*\s+(?:\w+\s+){0,3}?(?:a |an )?(?:heart attack|stroke|"
    r"seizure|cardiac arrest|death|an overdose|anaphyla\w*|organ failure|liver failure|kidney failure)\b"
)
I_GIVE_OTHER = (
    r"\bi (?:gave|give|put|slipped|slip|injected|inject|were to give|was to give|"
    r"secretly give)\b[^.?!]{0,30}?\b(?:someone|somebody|a person|him|her|them|my \w+)\b"
)
TAMPER = (
    r"\btamper\w* with (?:someone'?s|somebody'?s|his|her|their|my [\w-]+'?s) (?:\w+ )?(?:insulin|pump|meds|"
    r"medications?|pills|pacemaker|oxygen|inhaler|iv|drip|food|drink)\b"
)
DRINK_OR_FOOD = (
    r"(?:(?:a|the|his|her|their|someone'?s|somebody'?s|my [\w-]+'?s|[\w-]+'s)\s+)(?:\w+\s+)?(?:drink|food|"
    r"coffee|tea|meal|soup|beer|wine|juice|water|smoothie|dinner|lunch|breakfast|cup|glass|bottle)\b"
)
SPIKE = (
    r"\b(?:slip|sneak|spike|lace|hide)\w*\s+(?:\w+\s+){0,4}?(?:in|into)\s+"
    + DRINK_OR_FOOD
    + r"|\b(?:slip|put|mix|add|crush|sneak|dissolve|spike|lace|drop)\w*\s+(?:\w+\s+){0,4}?(?:in|into|to)\s+(?:(?:a|"
    r"the|his|her|their|someone'?s|somebody'?s|my [\w-]+'?s|[\w-]+'s)\s+)(?:\w+\s+)?(?:drink|food|coffee|tea|meal|"
    r"soup|beer|wine|juice|water|smoothie|dinner|lunch|breakfast|cup|glass|bottle)\b[^.?!]{0,50}?\b(?:knock|"
    r"sleeps?|sick|ill|pass out|unconscious|kill|notice|know|taste|out of it|drowsy|die|dead)\w*|\b(?:in|"
    r"into) (?:a|someone'?s|somebody'?s|his|her|their|my [\w-]+'?s) (?:drink|food|coffee|tea|meal|juice|"
    r"water)\b[^.?!]{0,40}?\b(?:make|knock|kill|sick|pass out|sleep|unconscious)\w*"
)
GET_TO_TAKE = (
    rf"\b(?:get|make|trick|convince|force)\s+{PERSON_OBJ}\s+(?:to\s+)?(?:(?:take|swallow|drink|eat)\s+"
    r"(?:\w+\s+){0,3}?(?:too many|too much|all|an overdose|a lethal|extra|double)|overdose|od)\b"
)
VICTIM = r"(?:him|her|them|my \w+|someone|somebody|a person|people|a man|a woman|a guy|a girl)"
INCAPACITATE = (
    rf"\b(?:what|which|how)\b[^.?!]{{0,50}}?\bto (?:make|get) {VICTIM} "
    r"(?:pass out|black out|unconscious|sick|ill|stop breathing|overdose|die)\b|"
    rf"\b(?:what|which|how)\b[^.?!]{{0,50}}?\bknock\w* {VICTIM} out\b|\b(?:what|which|"
    rf"how)\b[^.?!]{{0,50}}?\b(?:into|in|to)\s+{VICTIM}\b[^.?!]{{0,15}}?\bto (?:stop (?:their|his|her|"
    r"the) (?:heart|breathing)|kill (?:him|her|them))\b|"
    rf"\b{HARM_FRAME}\s+(?:\w+\s+){{0,2}}?(?:cause|induce|trigger|"
    rf"give)\s+(?:(?:\w+\s+){{0,2}}?{VICTIM}\s+)?"
    r"(?:a |an )?(?:heart attack|stroke|seizure|cardiac arrest|allergic reaction|anaphyla\w*)"
    rf"(?:\s+(?:in|to)\s+{VICTIM})?"
)
PAINLESS = (
    r"\b(?:drug|pill|medication|overdose|way to die|method|poison)s?\b[^.?!]{0,30}\b(?:most painless|"
    r"least painful|painless)\b|\b(?:most painless|least painful|painless)\b[^.?!]{0,20}\b(?:drug|pill|"
    r"medication|overdose|way to die|method|poison)s?\b"
)
LETHAL_METHOD = (
    r"\bhow (?:to|can someone|would someone|does someone|do you) (?:successfully |painlessly |"
    r"quickly )?(?:overdose|od)\b(?! on (?:vitamin|water|caffeine))(?![^.?!]*\baccident)|\b(?:best|"
    r"easiest|quickest|most painless|surest) (?:drug|pill|medication|medicine|way) to (?:overdose|od)\b|"
    r"\bcan (?:you|someone|a person) (?:kill|off) (?:yourself|themselves|himself|herself) (?:with|by|"
    r"using|on)\b|\b(?:what|which|best|fastest|quickest|"
    r"strongest)\b[^.?!]{0,25}\bpoisons?\b[^.?!]{0,30}\b(?:works?|kills?|acts?|fastest|quickest|"
    r"untraceable|undetectable|to use)\b"
)
INTENT_TO_HARM = rf"\b{I_WILL}\s+(?:to\s+)?(?:kill|poison|hurt|harm|stab|shoot|murder|strangle|drug)\s+{PERSON_OBJ}"

ACQUIRE = (
    r"\b(?:buy|buying|bought|purchase|purchasing|order|ordering|get|getting|obtain|obtaining|score|scoring|cop|"
    r"copping|find|source|sourcing|pick up|hands on|acquire|sells?|selling|sold|ship\w*|grab)\b"
)
NO_RX = (
    r"\b(?:without (?:a |an |any |my |the |needing (?:a )?|having (?:a )?|seeing (?:a )?|going to (?:a |"
    r"the )?)?(?:prescription|script|rx|doctor|doc|dr|physician|gp|md|prescriber|medical (?:card|license|"
    r"approval)|appointment|visit)|no (?:prescription|script|rx|doctor|questions asked)|(?:prescription|rx|"
    r"script)[- ]free|non[- ]?prescription|off (?:the )?streets?|on the street|street (?:dealer|price)|dealers?|"
    r"plug|dark ?web|darknet|dark net|deep web|black market|illegally|under the table)\b"
)
ONLINE = r"\b(?:online|internet|websites?|site|web|telegram|snapchat|instagram|reddit|discord|app)\b"
SEEK = (
    r"\b(?:where|which|best|cheap\w*|how|any|who|legit|reliable|trusted|recommend\w*|channels?|groups?|vendors?|"
    r"sellers?|shops?|accounts?|links?|sources?)\b"
)
FAKE_RX = (
    r"\b(?:fake|faking|forge|forging|forged|counterfeit|fraudulent|make (?:a |my own |up a )|write (?:a fake |"
    r"my own |myself a |up a fake )|print (?:a |my own |fake ))\s*(?:\w+\s+){0,2}?(?:prescriptions?|scripts?|rx|"
    r"(?:doctor'?s |dr'?s )?signature on a (?:script|prescription))\b|\bforge (?:a |my |the )?(?:doctor'?s |"
    r"dr'?s )signature\b|\b(?:alter|altering|change|changing|edit|editing|modify|modifying|"
    r"tamper\w*)\s+(?:\w+\s+){0,2}?(?:quantity|number|amount|refills?|date|dose|"
    r"dosage)\b[^.?!]{0,20}?\b(?:prescription|script|rx)\b|\bprescription pads?\b|\bdoctor[- ]shop\w*"
)
DECEIVE = (
    r"\b(?:fake|faking|pretend\w*|exaggerat\w*|lie about|lying about|lie to|lying to|lie|lying|make up|trick|"
    r"even though i'?m not|(?:when|though|if|but|although) (?:i|you|someone|one|people|they) (?:don'?t|do not|"
    r"dont|doesn'?t) (?:really |actually )?(?:have|need)|not (?:really )?in pain|don'?t (?:actually|"
    r"really) (?:have|need))\b"
)
DECEIVE_GOAL = r"\b(?:prescrib\w*|get|give|to be prescribed|script)\b"
SEEK_SELLER = r"\b(?:who|where)\b[^.?!]{0,20}\b(?:sells?|selling|deals?|dealing|buy|score|cop|get)\b"
# asking where to get treatment or a legitimate refill is not seeking a dealer
LEGIT_SOURCE = (
    r"\b(?:prescri\w*|pharmac\w*|refill\w*|treatment|clinic|program|rehab|detox|legally|doctor|dr|"
    r"psychiatrist|insurance|covered)\b"
)
WRITE_ME_RX = (
    r"\b(?:write|give|send|prescribe)\s+me\s+(?:a |an )?(?:prescription|script|rx)\b|\bprescribe me\b|"
    r"\bmore \w+ than (?:my |the |what my |what the )?(?:doctor|dr|prescriber|prescription|"
    r"psychiatrist)\w* (?:prescribes|gives|allows|says|lets)"
)
SEDATE_OTHER = (
    r"\b(?:give|slip|put)\w*\s+(?:\w+\s+){0,3}?(?:my|his|her|their|a|"
    r"the)\s+\w+(?:\s+\w+)?\s+(?:to make (?:him|her|them) (?:sleep|drowsy|pass out|calm down|groggy)|"
    r"so (?:he|she|they) (?:sleeps?|will sleep|passes out|won'?t wake))"
)
STEAL = (
    r"\b(?:steal|stealing|stole|swipe|swiping|pinch|nick|sneak)\w*\s+(?:\w+\s+){0,3}?(?:"
    + CONTROLLED
    + r"|pills|meds|medications?|prescriptions?)\b"
)


_RULES: tuple[Rule, ...] = (
    # emergency: cardiac
    _rule("cardiac.chest_pain_with_associated", "emergency.cardiac", EPISODE, CHEST, CARDIAC_ASSOC),
    _rule("cardiac.severe_chest_pain", "emergency.cardiac", EPISODE, SEVERE_CHEST),
    _rule("cardiac.heart_attack_now", "emergency.cardiac", EPISODE, HEART_ATTACK_NOW),
    # jaw or arm pain with breathlessness and nausea, often without chest pain (women, older people, diabetes)
    _rule("cardiac.atypical_symptoms", "emergency.cardiac", EPISODE, JAW_OR_ARM, BREATHLESS, NAUSEA_SWEAT),
    # emergency: stroke (FAST signs, sudden vision loss, thunderclap headache)
    _rule("stroke.face_droop", "emergency.stroke", EPISODE, FACE_DROOP, unless=FACE_EXPLAINED),
    _rule(
        "stroke.face_numb_one_side",
        "emergency.stroke",
        EPISODE,
        FACE_NUMB,
        f"{ONE_SIDE}|{SUDDEN}",
        same_sentence=True,
        unless=FACE_EXPLAINED,
    ),
    _rule(
        "stroke.limb_weakness_one_side",
        "emergency.stroke",
        EPISODE,
        LIMB_WEAK,
        f"{ONE_SIDE}|{SUDDEN}",
        same_sentence=True,
    ),
    _rule("stroke.slurred_speech", "emergency.stroke", EPISODE, SLURRED),
    _rule("stroke.sudden_speech_loss", "emergency.stroke", EPISODE, SPEECH_LOSS, SUDDEN, same_sentence=True),
    _rule("stroke.sudden_confusion", "emergency.stroke", EPISODE, CONFUSED, SUDDEN, same_sentence=True),
    _rule("stroke.vision_loss", "emergency.stroke", EPISODE, VISION_LOSS),
    _rule("stroke.sudden_blindness", "emergency.stroke", EPISODE, SUDDEN_BLIND, SUDDEN, same_sentence=True),
    _rule("stroke.thunderclap_headache", "emergency.stroke", EPISODE, THUNDERCLAP),
    _rule("stroke.stroke_now", "emergency.stroke", EPISODE, STROKE_NOW),
    # emergency: bleeding
    _rule("bleeding.wont_stop", "emergency.bleeding", EPISODE, BLEED_WONT_STOP, unless=NOT_ACUTE_BLEED),
    _rule("bleeding.severe", "emergency.bleeding", EPISODE, BLEED_SEVERE, unless=NOT_ACUTE_BLEED),
    _rule("bleeding.vomiting_blood", "emergency.bleeding", EPISODE, VOMIT_BLOOD),
    _rule("bleeding.prolonged", "emergency.bleeding", EPISODE, BLEED_LONG, unless=NOT_ACUTE_BLEED),
    _rule("bleeding.heavy_with_warning_sign", "emergency.bleeding", EPISODE, HEAVY_BLEED, BLEED_WARNING),
    # emergency: anaphylaxis
    _rule("anaphylaxis.throat_closing", "emergency.anaphylaxis", EPISODE, THROAT, unless=THROAT_INFECTION),
    _rule("anaphylaxis.tongue_swelling", "emergency.anaphylaxis", EPISODE, TONGUE),
    _rule(
        "anaphylaxis.swelling_with_trigger", "emergency.anaphylaxis", EPISODE, LIPS_FACE, f"{ALLERGEN}|{BREATH_TROUBLE}"
    ),
    _rule("anaphylaxis.allergen_breathing", "emergency.anaphylaxis", EPISODE, ALLERGEN, BREATH_TROUBLE),
    _rule("anaphylaxis.named", "emergency.anaphylaxis", EPISODE, ANAPHYLAXIS_NOW),
    # emergency: overdose and poisoning
    _rule("overdose.too_many_taken", "emergency.overdose_poisoning", EPISODE, OVERDOSE_TAKEN, recent_ok=True),
    _rule("overdose.overdosed", "emergency.overdose_poisoning", EPISODE, OVERDOSED, recent_ok=True),
    _rule("overdose.found_with_pills", "emergency.overdose_poisoning", EPISODE, FOUND_WITH_PILLS),
    _rule("poisoning.substance_ingested", "emergency.overdose_poisoning", EPISODE, POISON_TAKEN, recent_ok=True),
    _rule("poisoning.child_ingestion", "emergency.overdose_poisoning", EPISODE, CHILD_INGESTED, recent_ok=True),
    _rule("poisoning.carbon_monoxide", "emergency.overdose_poisoning", EPISODE, CO_ALARM),
    # emergency: breathing, circulation, consciousness
    _rule("breathing.not_breathing", "emergency.breathing", EPISODE, NOT_BREATHING),
    _rule("breathing.cannot_breathe", "emergency.breathing", EPISODE, CANT_BREATHE),
    _rule("breathing.severe_asthma", "emergency.breathing", EPISODE, SEVERE_ASTHMA),
    _rule("breathing.unresponsive", "emergency.breathing", EPISODE, UNRESPONSIVE),
    _rule("breathing.collapsed", "emergency.breathing", EPISODE, COLLAPSED),
    _rule("breathing.abnormal_while_unconscious", "emergency.breathing", EPISODE, KNOCKED_OUT, ABNORMAL_BREATHING),
    _rule("breathing.injured_not_moving", "emergency.breathing", EPISODE, TRAUMA, NOT_MOVING, same_sentence=True),
    _rule("breathing.choking", "emergency.breathing", EPISODE, CHOKING),
    _rule("breathing.limp", "emergency.breathing", EPISODE, LIMP),
    _rule("breathing.drowning", "emergency.breathing", EPISODE, DROWNING),
    # emergency: seizures
    _rule("seizure.ongoing", "emergency.seizure", EPISODE, SEIZING),
    _rule("seizure.first", "emergency.seizure", EPISODE, FIRST_SEIZURE),
    _rule(
        "seizure.first_never_before",
        "emergency.seizure",
        EPISODE,
        r"\b(?:seizure|fit|convulsion)s?\b",
        r"\bnever had (?:one|a seizure|a fit|seizures|a convulsion|anything like (?:this|that)) before\b",
        recent_ok=True,
    ),
    _rule("seizure.prolonged", "emergency.seizure", EPISODE, LONG_SEIZURE),
    _rule("seizure.repeated", "emergency.seizure", EPISODE, REPEATED_SEIZURE),
    # emergency: other red flags
    _rule("other.head_injury_red_flag", "emergency.other", EPISODE, HEAD_INJURY, HEAD_RED_FLAG, same_sentence=True),
    _rule("other.meningitis_signs", "emergency.other", EPISODE, MENINGITIS),
    _rule("other.diabetic_ketoacidosis", "emergency.other", EPISODE, DKA),
    _rule("other.heat_stroke", "emergency.other", EPISODE, HEAT_STROKE),
    _rule("other.hypothermia", "emergency.other", EPISODE, HYPOTHERMIA),
    _rule("other.open_fracture", "emergency.other", EPISODE, OPEN_FRACTURE),
    _rule("other.snakebite", "emergency.other", EPISODE, SNAKEBITE),
    _rule("other.severe_burn", "emergency.other", EPISODE, SCALD),
    _rule("other.testicular_torsion", "emergency.other", EPISODE, TORSION),
    _rule("other.rigid_abdomen", "emergency.other", EPISODE, RIGID_ABDOMEN),
    # crisis
    _rule("suicidal.intent", "crisis.suicidal", INTENT, SUICIDAL_WANT),
    _rule("suicidal.ideation", "crisis.suicidal", INTENT, SUICIDAL_STATE),
    _rule("suicidal.passive", "crisis.suicidal", INTENT, SUICIDAL_PASSIVE),
    _rule("suicidal.self_kill_mention", "crisis.suicidal", INTENT, SELF_KILL_MENTION),
    _rule("suicidal.pill_plan", "crisis.suicidal", INTENT, PILL_PLAN, unless=DOSING_SCHEDULE),
    _rule("suicidal.dwelling_on_death", "crisis.suicidal", INTENT, DWELL_ON_DEATH, unless=DEATH_FEAR),
    _rule("suicidal.thoughts_of_method", "crisis.suicidal", INTENT, THOUGHTS_OF),
    _rule("suicidal.should_die", "crisis.suicidal", INTENT, SHOULD_DIE),
    _rule("suicidal.hopeless_no_point", "crisis.suicidal", INTENT, HOPELESS, BARE_POINT),
    _rule("suicidal.lethal_question_for_self", "crisis.suicidal", INTENT, FIRST_PERSON_LETHAL),
    _rule("suicidal.other_person", "crisis.suicidal", INTENT, THIRD_SUICIDAL),
    _rule("self_harm.intent", "crisis.self_harm", INTENT, SELF_HARM_INTENT),
    _rule("self_harm.acts", "crisis.self_harm", INTENT, SELF_HARM_ACTS),
    _rule("self_harm.other_person", "crisis.self_harm", INTENT, THIRD_SELF_HARM),
    _rule(
        "self_harm.with_tool", "crisis.self_harm", INTENT, SELF_HARM_TOOL, unless=r"\bshav\w*|\bcooking\b|\bchopping\b"
    ),
    _rule(
        "self_harm.deliberate_injury",
        "crisis.self_harm",
        INTENT,
        SELF_INJURY,
        DELIBERATE,
        same_sentence=True,
        unless=ACCIDENT_CONTEXT,
    ),
    # refuse
    _rule("lethal_dose.quantity_question", "harm.lethal_dose", REQUEST, LETHAL_QTY),
    _rule("lethal_dose.named_dose", "harm.lethal_dose", REQUEST, LETHAL_DOSE),
    _rule("lethal_dose.is_amount_lethal", "harm.lethal_dose", REQUEST, IS_QTY_LETHAL),
    _rule("lethal_dose.which_drug", "harm.lethal_dose", REQUEST, WHICH_LETHAL, unless=MIXING_RISK),
    _rule("lethal_dose.method", "harm.lethal_dose", REQUEST, LETHAL_METHOD),
    _rule("lethal_dose.painless", "harm.lethal_dose", REQUEST, PAINLESS),
    _rule(
        "illicit.no_prescription",
        "harm.illicit_acquisition",
        REQUEST,
        ACQUIRE,
        rf"\b{CONTROLLED}\b",
        NO_RX,
        same_sentence=True,
    ),
    _rule(
        "illicit.online_source",
        "harm.illicit_acquisition",
        REQUEST,
        ACQUIRE,
        rf"\b{CONTROLLED}\b",
        ONLINE,
        SEEK,
        same_sentence=True,
    ),
    _rule("illicit.fake_prescription", "harm.illicit_acquisition", REQUEST, FAKE_RX),
    _rule(
        "illicit.deceive_prescriber",
        "harm.illicit_acquisition",
        REQUEST,
        DECEIVE,
        DECEIVE_GOAL,
        rf"\b{CONTROLLED}\b|\b(?:pills|meds|prescription)\b",
        same_sentence=True,
    ),
    _rule("illicit.steal", "harm.illicit_acquisition", REQUEST, STEAL),
    _rule(
        "illicit.seek_seller",
        "harm.illicit_acquisition",
        REQUEST,
        SEEK_SELLER,
        rf"\b{CONTROLLED}\b",
        same_sentence=True,
        unless=LEGIT_SOURCE,
    ),
    _rule(
        "illicit.covert", "harm.illicit_acquisition", REQUEST, ACQUIRE, rf"\b{CONTROLLED}\b", COVERT, same_sentence=True
    ),
    _rule(
        "illicit.prescription_from_assistant",
        "harm.illicit_acquisition",
        REQUEST,
        WRITE_ME_RX,
        rf"\b{CONTROLLED}\b",
        same_sentence=True,
    ),
    _rule(
        "harm_others.sedate",
        "harm.harm_others",
        REQUEST,
        SEDATE_OTHER,
        rf"\b{CONTROLLED}\b|\bsedatives?\b",
        same_sentence=True,
    ),
    _rule("harm_others.method", "harm.harm_others", REQUEST, HARM_OTHERS),
    _rule("harm_others.covert", "harm.harm_others", REQUEST, COVERT, COVERT_HARM, same_sentence=True),
    _rule("harm_others.covert_dosing", "harm.harm_others", REQUEST, COVERT_DOSING, GIVE_DRUG, same_sentence=True),
    _rule("harm_others.cause_event", "harm.harm_others", REQUEST, CAUSE_EVENT, I_GIVE_OTHER, same_sentence=True),
    _rule("harm_others.tamper", "harm.harm_others", REQUEST, TAMPER),
    _rule("harm_others.spike_drink", "harm.harm_others", REQUEST, SPIKE),
    _rule("harm_others.make_take_too_much", "harm.harm_others", REQUEST, GET_TO_TAKE),
    _rule("harm_others.incapacitate", "harm.harm_others", REQUEST, INCAPACITATE),
    _rule("harm_others.stated_intent", "harm.harm_others", REQUEST, INTENT_TO_HARM),
)


# ---------------------------------------------------------------------------------------------
# matching


def _live(doc: _Doc, rule: Rule, m: re.Match) -> int | None:
    """The sentence index if this match counts for `rule`, else None."""
    index = doc.sentence_of(m.start())
    s = doc.sentences[index]
    if doc.negated(s, m.start()):
        return None
    if rule.unless is not None and rule.unless.search(doc.text[s.start : s.end]):
        return None
    if rule.kind == REQUEST:
        return index
    clause = s.clause_of(m.start())
    in_conditional = [fp for a, b, fp in s.conditionals if a <= m.start() < b]
    # "what should I do if I feel like killing myself" is still about the asker
    if in_conditional and clause.now != "deictic" and (rule.kind == EPISODE or not any(in_conditional)):
        return None
    if rule.kind == INTENT:
        if s.taught:
            return None
        if s.generic_subject and not s.personal:
            return None
        # "I tried to kill myself last week and I still think about it" is current
        return None if clause.past == "distant" and clause.now is None else index
    if s.general:
        return None
    return index if _current(clause, rule) else None


def _current(clause: _Clause, rule: Rule) -> bool:
    strong = clause.now in ("deictic", "strong")
    if clause.past == "distant" and not strong:
        return False
    if clause.past == "recent" and clause.now is None and not rule.recent_ok:
        return False
    return strong or not clause.habitual


def _fires(doc: _Doc, rule: Rule) -> bool:
    per_pattern = []
    for pattern in rule.patterns:
        hits = [(i, m.start()) for m in pattern.finditer(doc.text) if (i := _live(doc, rule, m)) is not None]
        if not hits:
            return False
        per_pattern.append(hits)
    if rule.same_sentence:
        shared = set.intersection(*({i for i, _ in hits} for hits in per_pattern))
        return any(doc.sentences[i].end > doc.min_start for i in shared)
    return any(start >= doc.min_start for hits in per_pattern for _, start in hits)


def match_rules(text: str, context: str | None = None) -> list[Rule]:
    """The rules that fire on `text`; with `context` (the previous user message) a rule may combine both,
    but at least one of its matches must lie in `text`."""
    latest = normalise(text)
    if context:
        earlier = normalise(context)
        doc = _Doc(earlier + "\n" + latest, min_start=len(earlier) + 1)
    else:
        doc = _Doc(latest)
    return [rule for rule in _RULES if _fires(doc, rule)]


# ---------------------------------------------------------------------------------------------
# public API


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


# a follow-up that the situation goes on or grows: "it's getting worse", "she still isn't waking up"
_WORSENING = re.compile(
    r"\b(?:worse|worsening|spreading|not (?:getting |any )?better|still (?:not|no|isn'?t|won'?t|"
    r"can'?t|hasn'?t|doesn'?t|does ?n'?t|unconscious|bleeding|shaking|seizing|vomiting))\b"
)


class Triage:
    """`Triage(config, model).check_messages(messages) -> Decision`. config: emergency_number, crisis_line
    (required: a wrong country's number is worse than none) and, optionally, emergency_reply /
    crisis_reply / refuse_reply templates that may use {emergency_number} and {crisis_line}. `model`:
    a medlora.safety.triage_model model, or None for rules only; `Triage.from_config` loads the one
    `config["model"]` names."""

    def __init__(self, config: Mapping, model=None):
        self.values = {key: self._required(config, key) for key in ("emergency_number", "crisis_line")}
        self.replies = {key: self._template(config, key) for key in _REQUIRED_PLACEHOLDER}
        self.model = model
        self._paths = {
            self.replies["emergency_reply"].strip(): "emergency",
            self.replies["crisis_reply"].strip(): "crisis",
        }

    @classmethod
    def from_config(cls, config: Mapping, cache_dir: str, device: str = "cpu") -> Triage:
        from medlora.safety import triage_model

        triage = cls(config)  # the replies are checked before a model loads
        triage.model = triage_model.load(
            config.get("model"),
            cache_dir,
            device,
            guard=config.get("guard"),
            batch_size=int(config.get("batch_size") or 16),
        )
        return triage

    @staticmethod
    def _required(config: Mapping, key: str) -> str:
        value = config.get(key)
        if not isinstance(value, str) or not value.strip():
            example = (
                '"911" (US), "112" (EU) or "999" (UK)'
                if key == "emergency_number"
                else '"988 Suicide & Crisis Lifeline (call or text 988)"'
            )
            raise TriageConfigError(f"triage {key}={value!r} is invalid: give the local value, e.g. {example}.")
        return value.strip()

    def _template(self, config: Mapping, key: str) -> str:
        # a reply the config leaves out is the medical default (medlora/config/safety.py)
        template = config.get(key) or medical_defaults()["triage"][key]
        unknown = _placeholders(template) - set(self.values)
        if unknown:
            raise TriageConfigError(
                f"triage {key} uses unknown placeholder(s) {sorted(unknown)}: only "
                "{emergency_number} and {crisis_line} are filled in."
            )
        if _REQUIRED_PLACEHOLDER[key] not in _placeholders(template):
            raise TriageConfigError(
                f"triage {key} must contain {{{_REQUIRED_PLACEHOLDER[key]}}} so the reply "
                "tells the person whom to contact."
            )
        return template.format(**self.values)

    def check(self, text: str, context: str | None = None) -> Decision:
        """The rules alone on one message (and the user message before it)."""
        rules = match_rules(text, context)
        action = next((a for a in ACTIONS if any(r.action == a for r in rules)), "allow")
        ordered = sorted(rules, key=lambda r: ACTIONS.index(r.action))
        categories = list(dict.fromkeys(r.category for r in ordered))
        return Decision(
            action, categories, [r.id for r in ordered], self.reply_for(action), source="rules" if rules else ""
        )

    def reply_for(self, action: str) -> str | None:
        return self.replies.get(f"{action}_reply")

    def check_messages(self, messages: Sequence[Mapping]) -> Decision:
        return self.check_many([messages])[0]

    def check_many(self, conversations: Sequence[Sequence[Mapping]]) -> list[Decision]:
        """Each conversation triaged as it stands after its latest user turn; the model runs batched."""
        scores = self.model.scores(conversations) if self.model is not None else [None] * len(conversations)
        return [self._decide(messages, found) for messages, found in zip(conversations, scores)]

    def _decide(self, messages: Sequence[Mapping], scores: dict | None) -> Decision:
        users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
        if not users:
            return Decision("allow", [], [], None, source="")
        rules = self.check(users[-1], users[-2] if len(users) > 1 else None)
        votes = {
            "rules": rules.action,
            "sticky": self.path_of(messages),
            "model": self.model.decide(scores) if scores is not None else "allow",
        }
        action = next(a for a in ACTIONS if a in votes.values())
        if action == "allow":
            return Decision("allow", [], [], None, source="", scores=scores)
        source = "+".join(name for name, vote in votes.items() if vote == action)
        extra = [f"{name}.{vote}" for name, vote in votes.items() if name != "rules" and vote != "allow"]
        return Decision(
            action,
            [*rules.categories, *extra],
            [*rules.rule_ids, *extra],
            self.reply_for(action),
            source=source,
            scores=scores,
        )

    def path_of(self, messages: Sequence[Mapping]) -> str:
        """emergency or crisis when the conversation is already on that path, else allow: an earlier reply
        was that fixed reply, or the latest message says it is getting worse (or still not better) after
        an earlier one the rules find to be an emergency or crisis (history passed in whole, or a client
        that never showed the fixed reply). A later question on another matter leaves it."""
        found = {self._paths.get(str(m.get("content") or "").strip()) for m in messages if m.get("role") == "assistant"}
        users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
        if len(users) > 1 and _WORSENING.search(normalise(users[-1])):
            found |= {self.check(text, users[i - 1] if i else None).action for i, text in enumerate(users[:-1])}
        return next((a for a in ("emergency", "crisis") if a in found), "allow")
