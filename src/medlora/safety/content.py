"""Content filter for TRAINING conversations: find assistant turns that teach or endorse harm.

Rule ids (stable strings, used in reports):
  content.self_harm_method      how to harm or kill oneself, or how to hide self-harm
  content.overdose_info         lethal or overdose quantities, how to overdose
  content.illicit_acquisition   getting controlled substances illegally: no prescription, dark web, forged
                                prescriptions, doctor shopping, faked symptoms, someone else's supply
  content.dangerous_advice      advice that endangers health: stop insulin, drink bleach, double the dose,
                                aspirin for a child with flu, no need to see a doctor for chest pain ...

A topic is never enough: a reply that mentions suicide, overdose or the dark web while urging help, warning or
declining is exactly what the model should learn. A rule fires on an assistant sentence that states the harmful
act in an endorsing frame: not negated ('don't', 'never', 'avoid'), not a warning ('... is dangerous'), not a
hypothetical ('if a child drinks bleach'), not reported speech ('some websites claim'), not a question. Some cues
also need the conversation to show a context (self-harm intent, a child, a red-flag symptom ...).
"""

from __future__ import annotations

import multiprocessing
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from medlora.safety.text import clause_starts, negated, sentences

SELF_HARM = "content.self_harm_method"
OVERDOSE = "content.overdose_info"
ILLICIT = "content.illicit_acquisition"
DANGEROUS = "content.dangerous_advice"
RULES = (SELF_HARM, OVERDOSE, ILLICIT, DANGEROUS)
ACTIONS = ("drop", "flag")


def _rx(*alternatives: str) -> re.Pattern:
    return re.compile("|".join(alternatives), re.IGNORECASE)


def _alt(*options: str) -> str:
    return "(?:" + "|".join(options) + ")"


# ---------------------------------------------------------------- vocabulary

_CONTROLLED = _alt(
    r"opioids?",
    r"opiates?",
    r"oxy(?:codone|contin|s)?",
    r"percocets?",
    r"vicodin",
    r"hydrocodone",
    r"norco",
    r"fentanyl",
    r"morphine",
    r"codeine",
    r"tramadol",
    r"dilaudid",
    r"hydromorphone",
    r"methadone",
    r"buprenorphine",
    r"suboxone",
    r"heroin",
    r"benzos?",
    r"benzodiazepines?",
    r"xanax",
    r"xannies",
    r"alprazolam",
    r"valium",
    r"diazepam",
    r"klonopin",
    r"clonazepam",
    r"ativan",
    r"lorazepam",
    r"adderall",
    r"amphetamines?",
    r"dexedrine",
    r"ritalin",
    r"methylphenidate",
    r"concerta",
    r"vyvanse",
    r"modafinil",
    r"ketamine",
    r"(?:anabolic\s+)?steroids",
    r"testosterone",
    r"ambien",
    r"zolpidem",
    r"lyrica",
    r"pregabalin",
    r"gabapentin",
    r"soma",
    r"carisoprodol",
    r"phenobarbital",
    r"barbiturates?",
    r"painkillers?",
    r"pain\s*(?:pills|meds|medications?|killers)",
    r"prescription\s+(?:drugs|meds|medications?|pills|painkillers|opioids|stimulants)",
    r"controlled\s+(?:substances?|drugs|medications?)",
    r"stimulants",
    r"sleeping\s+pills",
    r"narcotics",
)
_MEDS = r"(?:meds|medications?|medicines?|pills|drugs|tablets)"
# Stopping these without a clinician can kill: seizures, DKA, clots, rebound, withdrawal, rejection. (Not dialysis:
# declining or stopping it is a legitimate end-of-life choice that good answers discuss.)
_CRITICAL = _alt(
    r"insulin",
    r"medications?",
    r"medicines?",
    r"meds",
    r"pills",
    r"blood\s+thinners?",
    r"anticoagulants?",
    r"warfarin",
    r"coumadin",
    r"eliquis",
    r"apixaban",
    r"xarelto",
    r"rivaroxaban",
    r"heparin",
    r"clopidogrel",
    r"plavix",
    rf"(?:seizure|epilepsy|blood\s+pressure|bp|heart|hiv|transplant|thyroid|tb)\s+{_MEDS}",
    r"anticonvulsants?",
    r"anti-?epileptics?",
    r"keppra",
    r"levetiracetam",
    r"lamotrigine",
    r"depakote",
    r"valproate",
    r"phenytoin",
    r"carbamazepine",
    r"beta[- ]blockers?",
    r"metoprolol",
    r"antidepressants?",
    r"ssris?",
    r"lithium",
    r"antipsychotics?",
    r"steroids?",
    r"prednisone",
    r"hydrocortisone",
    r"inhalers?",
    r"preventer",
    r"antiretrovirals?",
    r"immunosuppressants?",
    r"tacrolimus",
    r"chemo(?:therapy)?",
    r"statins?",
    r"levothyroxine",
    r"antibiotics?",
    r"nitroglycerin",
    r"digoxin",
    r"amiodarone",
    r"methadone",
    r"buprenorphine",
    r"suboxone",
    r"benzodiazepines?",
    r"clonazepam",
)
_QUANTITY = _alt(
    r"\b\d[\d,.]*\s*(?:-|to)?\s*(?:\d[\d,.]*\s*)?(?:mg|milligrams?|g|grams?|mcg|µg|micrograms?|ml|milliliters?|units?|"
    r"iu|pills?|tablets?|tabs|capsules?|caps|mg/kg|g/kg|patches|bottles?|doses|times)\b",
    r"\b(?:a|an|one|the)\s+(?:whole|entire|full)\s+(?:bottle|pack|box|packet|strip|supply|prescription)\b",
    r"\b(?:ten|twenty|thirty|forty|fifty|a\s+hundred|dozens?\s+of|a\s+handful\s+of)\s+(?:pills|tablets|capsules)\b",
)
_ABOUT = r"(?:about\s+|around\s+|roughly\s+|approximately\s+|at\s+least\s+|over\s+|more\s+than\s+)?"
_TO_DIE = r"(?:overdose|od|die|kill\s+yourself|end\s+(?:it|your\s+life))"
_CHILD = _rx(
    r"\b(?:child|children|kids?|baby|babies|toddlers?|teens?|teenagers?|infants?|newborns?|son|daughter|"
    r"little\s+one|\d+[- ](?:year|month|week)[- ]old|under\s+(?:1[0-9]|[1-9]|one|two|twelve|sixteen|eighteen))\b"
)
_INFANT = _rx(
    r"\b(?:baby|babies|infants?|newborns?|\d{1,2}[- ](?:month|week)[- ]old|under\s+(?:1|one|12\s+months)\b|"
    r"less\s+than\s+(?:1|one)\s+year)"
)
_CONTROLLED_RX = _rx(rf"\b{_CONTROLLED}\b")

_SELF_HARM_INTENT = _rx(
    r"\bkill\s+(?:myself|yourself|themselves|himself|herself)\b",
    r"\bsuicid\w*",
    r"\bend\s+(?:it|things)\b",
    r"\bend(?:ing)?\s+(?:my|your|his|her|their)\s+(?:own\s+)?life\b",
    r"\btake\s+my\s+(?:own\s+)?life\b",
    r"\b(?:want|wanna)\s+(?:to\s+)?die\b",
    r"\bdon'?t\s+want\s+to\s+(?:live|be\s+alive|wake\s+up)\b",
    r"\bnot\s+wake\s+up\b",
    r"\bself[- ]harm\w*",
    r"\b(?:cut|cutting|hurt|hurting|harm|harming|hang)\s+myself\b",
    r"\bpainless(?:ly)?\b",
    r"\bdie\s+(?:quickly|peacefully|in\s+my\s+sleep)\b",
    r"\boverdose\s+on\s+purpose\b",
    r"\bnoose\b",
    r"\blethal\b",
    r"\bfatal\b",
)
_OVERDOSE_INTENT = _rx(
    r"\bhow\s+(?:many|much)\b[^?.]{0,60}\b(?:die|kill|overdose|od|lethal|fatal|deadly|dead|not\s+wake)\b",
    r"\b(?:lethal|fatal|deadly)\s+(?:dose|amount)",
    r"\boverdose\s+(?:on|with)\b",
    r"\b(?:want|wanna|going|plan(?:ning)?|trying|try)\s+to\s+(?:overdose|od)\b",
)
_RED_FLAG = _rx(
    r"\bchest\s+(?:pain|pressure|tightness)",
    r"\bcrushing\b",
    r"\bheart\s+attack",
    r"\bstroke\b",
    r"\bface\s+(?:is\s+)?drooping",
    r"\bslurred\s+speech",
    r"\bcan'?t\s+breathe",
    r"\b(?:trouble|difficulty)\s+breathing",
    r"\bshort(?:ness)?\s+of\s+breath",
    r"\bvomit(?:ing|ed)?\s+blood",
    r"\bcough(?:ing|ed)?\s+up\s+blood",
    r"\bblood\s+in\s+(?:my|your|the)?\s*(?:vomit|stool)",
    r"\bblack\s+(?:tarry\s+)?stools?",
    r"\b(?:worst|severe)\s+headache",
    r"\bthunderclap",
    r"\bseizures?\b",
    r"\bunconscious",
    r"\bpassed\s+out",
    r"\bfaint(?:ed|ing)\b",
    r"\bsuicidal",
    r"\boverdos\w+",
    r"\btook\s+too\s+many",
    r"\banaphyla\w+",
    r"\bthroat\s+(?:is\s+)?(?:swelling|closing)",
    r"\bswelling\s+of\s+(?:the\s+)?(?:throat|tongue|lips)",
    r"\bsevere\s+bleeding",
    r"\bbleeding\s+(?:that\s+)?won'?t\s+stop",
    r"\bhead\s+(?:injury|trauma)",
    r"\bhit\s+(?:my|his|her|their|your|the)\s+head",
    r"\b(?:fell|fall(?:en)?)\s+(?:\w+\s+){0,3}(?:hit|bumped|banged)\b",
    r"\bconcussion",
    r"\bknocked\s+(?:out|unconscious)",
    r"\bstiff\s+neck",
    r"\bfever\s+in\s+(?:a|an|my|your)?\s*(?:newborn|infant|baby)",
    r"\bnumbness\s+on\s+one\s+side",
    r"\bone[- ]sided\s+weakness",
    r"\bsudden\s+(?:weakness|confusion|vision\s+loss|blindness)",
    r"\btesticular\s+pain",
    r"\bsevere\s+abdominal\s+pain",
    r"\bketoacidosis",
    r"\bdka\b",
    r"\bpoison(?:ed|ing)?\b",
    r"\bswallowed\s+(?:a\s+)?(?:button\s+)?(?:battery|magnet|bleach)",
)
_ESCALATION = _rx(
    r"\b(?:911|999|112|988|emergency|er|a&e|urgent\s+care|ambulance|poison\s+control|right\s+away|immediately)\b",
    r"\b(?:see|call|contact)\s+(?:a|your)\s+(?:doctor|clinician|gp|provider|physician)\b",
    r"\bseek\s+(?:medical|immediate|urgent|emergency)\b",
    r"\bget\s+(?:medical\s+)?help\b",
)
# dismissing care is the advice that kills when said of a red flag (chest pain, stroke, head injury)
_DISMISSAL = _rx(
    r"\b(?:no\s+need\s+(?:to|for)|(?:you\s+)?(?:don'?t|do\s+not|won'?t)\s+(?:need|have)\s+to|needn'?t|"
    r"not\s+necessary\s+to|don'?t\s+bother\s+(?:to\s+|with\s+)?|no\s+reason\s+to)\s+"
    r"(?:go\s+to\s+|see\s+|call\s+|visit\s+|get\s+|seek\s+|going\s+to\s+|seeing\s+|calling\s+)?"
    r"(?:a\s+|the\s+|an\s+|your\s+)?"
    r"(?:doctor|physician|gp|er|emergency|hospital|911|ambulance|clinic|urgent\s+care|medical\s+(?:attention|care|help)|"
    r"checked|evaluated|seen)\b",
    r"\bsleep\s+it\s+off\b",
    r"\b(?:just|simply)\s+(?:wait\s+(?:it\s+out|and\s+see|until)|ignore\s+it)",
    r"\b(?:probably|likely|just|only|almost\s+certainly)\s+(?:nothing|anxiety|stress|gas|indigestion|heartburn|"
    r"a\s+pulled\s+muscle|muscle\s+strain|a\s+panic\s+attack)\b",
    r"\bnothing\s+to\s+worry\s+about\b",
    r"\bwait\s+(?:until|till)\s+(?:morning|tomorrow|next\s+week|it\s+(?:goes\s+away|passes))",
)


# ---------------------------------------------------------------- how a sentence frames the act

_NEGATION = _rx(
    r"\b(?:don'?t|do\s+not|does\s+not|doesn'?t|never|not|no\s+one|nobody|shouldn'?t|should\s+not|mustn'?t|"
    r"must\s+not|can'?t|cannot|won'?t|wouldn'?t|avoid|avoiding|refuse|instead\s+of|rather\s+than|against|"
    r"unsafe|dangerous|illegal|risky|harmful|warn\w*|stop\s+(?:anyone|people))\b"
)
_SENTENCE_NEGATION = _rx(
    r"^\W*(?:please\s+)?(?:don'?t|do\s+not|never|avoid|under\s+no\s+circumstances|"
    r"you\s+(?:should|must)\s+(?:never|not)|you\s+shouldn'?t|you\s+mustn'?t)\b"
    r"(?!\s+(?:worry|panic|be\s+(?:afraid|scared|alarmed|embarrassed|ashamed)|hesitate|feel\s+bad))"
)
# a sentence-opening 'Don't' covers the whole sentence unless a turn ('just', 'instead', 'but') starts new advice
_NEW_ADVICE = _rx(r"\b(?:just|instead|but|simply|rather)\b|;")
# 'don't start or stop medicines': a negation before coordinated verbs covers each of them
_COORDINATED_NEGATION = _rx(r"\b(?:don'?t|do\s+not|never|not|no)\s+(?:\w+\s+){1,3}(?:and|or|nor)\s+$")
_CONDITIONAL = _rx(r"\b(?:if|when|whenever|whether|in\s+case|unless|accidentally|by\s+accident)\b")
_REPORTED = _rx(
    r"\b(?:myths?|claims?|claimed|rumou?rs?|falsely|misinformation|hoax|contrary\s+to|is\s+false|"
    r"isn'?t\s+true)\b",
    r"\b(?:you\s+)?(?:may|might)\s+have\s+heard\b",
    r"\bsome\s+(?:people|websites|sites|sources|posts|influencers|videos)\s+(?:say|claim|suggest|believe|"
    r"recommend|think)\b",
    r"\byou\s+(?:mentioned|said|told\s+me|wrote|asked)\b",
    r"\byou'?re\s+(?:thinking|considering|planning)\s+(?:of|about)\b",
)
_WARNING_AFTER = _rx(
    r"^[^.]{0,80}?\b(?:(?:is|are|was|can\s+be|could\s+be|may\s+be|might\s+be|would\s+be|becomes?)\s+(?:\w+\s+){0,3}?"
    r"(?:dangerous|unsafe|illegal|risky|harmful|deadly|fatal|toxic|poisonous|life[- ]threatening|not\s+safe|never\s+safe|"
    r"not\s+recommended|not\s+advised|a\s+bad\s+idea|against\s+the\s+law|a\s+crime|a\s+felony|poison|danger|fake|"
    r"counterfeit|contaminated|laced)|contains?\s+fentanyl|without\s+(?:realizing|knowing|noticing)|"
    r"(?:can|could|may|might|will|would|does|do)\s+(?:\w+\s+)?(?:cause|kill|lead\s+to|result\s+in|damage|burn|harm|"
    r"injure|trigger|worsen|raise\s+the\s+risk)|isn'?t\s+(?:safe|legal|a\s+good\s+idea|recommended)|"
    r"aren'?t\s+(?:safe|legal)|not\s+(?:for|to|in)\s+(?:babies|infants|children|kids|anyone|teens)|"
    r"(?:won'?t|will\s+not|doesn'?t|does\s+not|can'?t|cannot)\s+(?:cure|help|work|treat|prevent)|"
    r"puts?\s+you\s+at\s+risk|increases?\s+(?:the\s+|your\s+)?risk|risks?\s+(?:a|an|serious|severe|death|overdose|"
    r"withdrawal|seizures?))\b"
)
_ADVISORY = _rx(
    r"\b(?:you\s+(?:can|could|should|might|may|need\s+to|have\s+to|must|will\s+want\s+to|'ll\s+want\s+to|"
    r"want\s+to|just|simply|only\s+need\s+to)|try(?:ing)?|i\s+(?:recommend|suggest|would|'d)|i'd|recommend|"
    r"suggest|it'?s\s+(?:perfectly\s+|totally\s+|completely\s+)?(?:fine|okay|ok|safe|best|better|easiest|"
    r"alright|all\s+right|good)\s+to|the\s+(?:best|easiest|safest|quickest|simplest|cheapest)\s+(?:way|thing|"
    r"option|place)\s+(?:is|would\s+be)\s+to|just|simply|go\s+ahead\s+and|feel\s+free\s+to|okay\s+to|fine\s+to|"
    r"safe\s+to)\b"
)
# words that may stand before a command's verb: 'Yes, just stop it', 'Please go ahead and double it'
_COMMAND_LEAD = frozenset(
    "please just simply then also first now so instead honestly yes yeah "  # noqa: SIM905
    "sure okay ok well basically definitely go ahead and try to really maybe perhaps "
    "absolutely totally always today tonight".split()
)
_CLAUSE_BREAK = re.compile(r"[,;:()\u2014\u2013]|\s-\s|\b(?:but|however|then|so|and|or)\b", re.IGNORECASE)
_THIRD_PERSON_ACTOR = _rx(
    r"\b(?:doctors?|physicians?|clinicians?|providers?|surgeons?|nurses?|teams?|specialists?|"
    r"pharmacists?|prescribers?|they|he|she)\s+(?:will|may|might|can|could|should|would|usually|"
    r"often|typically|sometimes|probably)\b"
)
_DESCRIBES_SELF_HARM = _rx(
    r"\b(?:examples?|signs?|forms?|types?|kinds?|methods?\s+people\s+use)\s+of\s+"
    r"(?:self[- ]harm|self[- ]injury|suicid\w+)"
)
_SEEK_HELP_FIRST = _rx(
    r"\b(?:talk|speak|check|ask|consult)\w*\s+(?:with\s+|to\s+)?(?:your|a|the)\s+(?:doctor|"
    r"clinician|prescriber|pharmacist|provider|physician|care\s+team|gp)\b"
)
_CLINICIAN = r"(?:your|a)\s+(?:doctor|clinician|prescriber)"
# what turns 'stop X' into sound advice: '... and call your doctor', '... gradually', '... before surgery'
_STOP_QUALIFIED = _rx(
    r"^[^.]{0,60}?\b(?:(?<!need\sto\s)(?<!have\sto\s)(?<!without\s)(?:gradually|slowly|taper\w*)|"
    r"after\s+(?:\d+|the|a|one|two|three|your|talking|checking|consulting)|once\s+(?:the|you|your)|"
    r"and\s+(?:then\s+)?(?:call|contact|see|talk|tell|check|ask|consult|seek|get|go)|"
    r"without\s+(?:first\s+)?(?:talking|checking|consulting|speaking|asking)|unless|until|if\b|"
    r"under\s+(?:medical\s+)?supervision|as\s+(?:directed|instructed|prescribed|advised)|"
    rf"before\s+(?:the|your|surgery|a|an)|only\s+(?:if|after|when|with)|on\s+(?:the\s+)?advice|with\s+{_CLINICIAN}|"
    rf"{_CLINICIAN}\s+(?:says|tells|advises|agrees))"
)
_DOSE_QUALIFIED = _rx(
    rf"^[^.]{{0,60}}?\b(?:as\s+(?:directed|prescribed|instructed)|under\s+(?:medical\s+)?supervision|"
    rf"only\s+(?:if|when)\s+{_CLINICIAN}|if\s+{_CLINICIAN}\s+(?:says|tells|advises|prescribes))"
)
_HEDGED = _rx(
    r"^[^.]{0,80}?\b(?:but|however|unless|except|although|though|see\s+(?:a|your)|call|seek|"
    r"get\s+(?:checked|help|seen))\b"
)


@dataclass(frozen=True)
class _Cue:
    rule: str
    regex: re.Pattern
    needs: str | None = None  # a context the conversation must show: see _Context.has
    advisory: bool = False  # must be said as advice: a command, 'you can/should', 'try', 'it's fine to'
    warnable: bool = True  # a warning after it ('... is dangerous') clears it
    sound_if: re.Pattern | None = None  # what, following it, makes it sound advice ('... and call your doctor')


def _self_harm_cues() -> list[_Cue]:
    superlative = (
        r"(?:most\s+(?:painless|effective|reliable|lethal|certain|successful|peaceful)|least\s+painful|"
        r"easiest|quickest|fastest|surest|best|simplest|cleanest|quietest)"
    )
    return [
        _Cue(
            SELF_HARM,
            _rx(
                rf"\b(?:the\s+)?{superlative}\s+(?:way|method|means|option)s?\s+(?:to|of|for)\s+(?:die|dying|"
                r"kill|end(?:ing)?|suicide|commit|hurt|harm|cut|overdose|death)"
            ),
            warnable=False,
        ),
        _Cue(
            SELF_HARM,
            _rx(
                r"\b(?:surest|best|easiest|quickest|fastest|simplest|most\s+\w+)\s+(?:way|method|means|"
                r"option)\s+(?:is|would\s+be)\s+(?:to\s+)?(?:hang\w*|cut\w*|jump\w*|overdos\w+|shoot\w*|"
                r"suffocat\w+|drown\w*|a\s+(?:firearm|gun)|carbon\s+monoxide|helium|poison\w*|slit\w*)"
            ),
            "self_harm",
            warnable=False,
        ),
        _Cue(
            SELF_HARM,
            _rx(
                r"\b(?:hang|strangle|suffocate|asphyxiate|drown|electrocute|shoot|stab|cut|burn|starve|"
                r"poison)\s+(?:yourself|myself|themselves|himself|herself|oneself)\b"
            ),
            "self_harm",
            advisory=True,
            warnable=False,
        ),
        _Cue(
            SELF_HARM,
            _rx(
                r"\b(?:cut|slit|slash|slice)\w*\s+(?:\w+\s+){0,3}(?:wrists?|forearms?|thighs?|veins?|"
                r"arter(?:y|ies)|throat)\b",
                r"\b(?:vertically|lengthwise|along\s+the\s+(?:vein|artery)|deep\s+enough)\b",
            ),
            "self_harm",
            warnable=False,
        ),
        _Cue(
            SELF_HARM,
            _rx(
                r"\b(?:noose|ligature|hanging\s+point)\b",
                r"\b(?:a|the)\s+(?:rope|belt|cord|sheet|scarf|ligature)\s+(?:tightly\s+)?a?round\s+"
                r"(?:your|the|my)\s+neck",
            ),
            "self_harm",
            warnable=False,
        ),
        _Cue(
            SELF_HARM,
            _rx(
                r"\bjump(?:ing)?\s+(?:off|from|in\s+front\s+of)\s+(?:a|an|the)?\s*(?:\w+\s+)?(?:bridge|"
                r"building|roof|cliff|balcony|tower|overpass|train|bus|truck|window|height|parking\s+garage)"
            ),
            "self_harm",
            warnable=False,
        ),
        _Cue(
            SELF_HARM,
            _rx(
                r"\b(?:carbon\s+monoxide|car\s+exhaust|exhaust\s+fumes|charcoal|helium|nitrogen|inert\s+gas)"
                r"\s+(?:\w+\s+){0,6}?(?:garage|closed|sealed|enclosed|tent|bag|hood|mask|tank)\b",
                r"\b(?:plastic|exit)\s+bag\s+over\s+(?:your|the)\s+head",
            ),
            "self_harm",
            warnable=False,
        ),
        _Cue(
            SELF_HARM,
            _rx(
                r"\b(?:gun|firearm|pistol|rifle|shotgun|barrel)\s+(?:\w+\s+){0,4}?(?:to|against|in|into|"
                r"under)\s+(?:your|the)\s+(?:head|temple|mouth|chin|heart)"
            ),
            warnable=False,
        ),
        _Cue(
            SELF_HARM,
            _rx(
                r"\b(?:hide|cover|conceal|disguise)\s+(?:up\s+)?(?:the\s+|your\s+|any\s+)?(?:cuts|scars|"
                r"marks|wounds|burns|self[- ]harm|bruises)"
            ),
            advisory=True,
        ),
    ]


def _overdose_cues() -> list[_Cue]:
    lethal = r"(?:lethal|fatal|deadly)"
    return [
        _Cue(
            OVERDOSE,
            _rx(
                rf"\b(?:{lethal}|killing)\s+(?:dose|amount|quantity|number|level)s?\b[^.?!]{{0,100}}?"
                rf"{_QUANTITY}"
            ),
            warnable=False,
        ),
        _Cue(
            OVERDOSE,
            _rx(
                rf"{_QUANTITY}[^.?!]{{0,60}}?\b(?:is|are|would|will|could|can|may|might)\s+(?:\w+\s+){{0,2}}?"
                rf"(?:be\s+)?{lethal}\b",
                rf"{_QUANTITY}[^.?!]{{0,60}}?\b(?:would|will|should|could|can|to|(?:is|are)\s+(?:usually\s+)?"
                rf"enough\s+to)\s+(?:kill|be\s+(?:{lethal}|enough\s+to\s+die)|end\s+(?:your|a)\s+life|"
                rf"stop\s+(?:your|the)\s+heart|cause\s+death|put\s+you\s+in\s+a\s+coma|make\s+sure\s+you\s+"
                rf"(?:die|don'?t\s+wake\s+up)|die|not\s+wake\s+up)\b",
            ),
            "overdose",
            warnable=False,
        ),
        _Cue(
            OVERDOSE,
            _rx(
                rf"\bto\s+{_TO_DIE}\b[^.?!]{{0,60}}?\b(?:take|need|swallow|use|requires?)\s+{_ABOUT}{_QUANTITY}",
                rf"\b(?:take|swallow|need|use)\s+{_ABOUT}{_QUANTITY}[^.?!]{{0,40}}?\bto\s+{_TO_DIE}",
            ),
            warnable=False,
        ),
        _Cue(
            OVERDOSE,
            _rx(
                rf"\b(?:take|swallow|need|use)\s+{_ABOUT}{_QUANTITY}[^.?!]{{0,40}}?\bto\s+(?:make\s+sure|"
                rf"be\s+sure|guarantee)"
            ),
            "overdose",
            warnable=False,
        ),
        _Cue(
            OVERDOSE,
            _rx(
                r"\b(?:take|swallow|down)\s+(?:the\s+|a\s+)?(?:whole|entire|full)\s+(?:bottle|pack|box|"
                r"supply|prescription)",
                r"\b(?:take|swallow)\s+all\s+(?:of\s+)?(?:your|the|those|these)\s+(?:pills|tablets|"
                r"medications?|meds|capsules)\s+at\s+once",
            ),
            "overdose",
            advisory=True,
            warnable=False,
        ),
        _Cue(
            OVERDOSE,
            _rx(
                rf"\b(?:mix|combine|take)\w*\s+(?:\w+\s+){{0,4}}?(?:with|and)\s+(?:alcohol|vodka|liquor|benzos?|"
                rf"opioids?|sleeping\s+pills)[^.?!]{{0,40}}?\bto\s+(?:make\s+(?:it|them)\s+(?:more\s+)?"
                rf"{lethal}|die|overdose|make\s+sure)"
            ),
            warnable=False,
        ),
    ]


def _illicit_cues() -> list[_Cue]:
    acquire = r"(?:buy|order|purchase|get|obtain|score|cop|source|find|pick\s+up)"
    dark = (
        r"(?:dark\s?web|darknet|deep\s+web|onion\s+(?:sites?|markets?|links?)|tor\s+(?:browser|markets?)|"
        r"silk\s+road|crypto\s*markets?)"
    )
    kin = r"(?:friend|mom|mother|dad|father|partner|roommate|sister|brother|grandma|grandmother|spouse|wife|husband)"
    others = rf"(?:someone\s+else'?s|\ba\s+{kin}'?s|\byour\s+{kin}'?s)"
    supply = rf"(?:prescription|pills|meds|medication|{_CONTROLLED})"
    no_script = r"(?:prescription|script|rx)"
    many = (
        r"(?:several|multiple|different|many|a\s+few|various|other|more\s+than\s+one)"
        r"(?:\s+(?:different|other|separate))?"
    )
    prescribers = (
        r"(?:doctors|physicians|ers|emergency\s+rooms|urgent\s+cares?|clinics|pharmacies|prescribers|providers|"
        r"dentists)"
    )
    symptoms = r"(?:pain|symptoms?|injury|adhd|anxiety|insomnia|panic\s+attacks?|migraines?)"
    return [
        _Cue(
            ILLICIT,
            _rx(rf"\b{acquire}\b[^.?!]{{0,80}}?\b(?:on|from|via|through|using|at)\s+(?:the\s+|a\s+)?{dark}"),
            advisory=True,
        ),
        _Cue(
            ILLICIT,
            _rx(
                rf"\b{dark}\s+(?:\w+\s+){{0,3}}(?:is|are)\s+(?:the\s+|a\s+)?(?:best|easiest|cheapest|safest|"
                r"good|great|reliable)"
            ),
        ),
        _Cue(
            ILLICIT,
            _rx(
                rf"\b{acquire}\b[^.?!]{{0,60}}?\b(?:without\s+(?:a\s+|any\s+)?(?:{no_script}|doctor)|"
                rf"no\s+{no_script}\s+(?:needed|required))"
            ),
            "controlled",
            advisory=True,
        ),
        _Cue(ILLICIT, _rx(rf"\b(?:don'?t|do\s+not)\s+(?:even\s+)?need\s+a\s+{no_script}\s+(?:to|for)\b"), "controlled"),
        _Cue(
            ILLICIT,
            _rx(
                rf"\b(?:sell|sells|ship|ships|offer|offers|deliver|delivers|carry|carries)\s+(?:\w+\s+){{0,3}}?"
                rf"{_CONTROLLED}\s+(?:\w+\s+){{0,3}}?(?:with\s+no|without(?:\s+a|\s+any)?|no)\s+{no_script}"
            ),
        ),
        _Cue(
            ILLICIT,
            _rx(
                r"\b(?:fake|forge|falsify|counterfeit|alter|modify|photocopy|steal|print)\s+(?:a\s+|the\s+|"
                r"your\s+|some\s+)?(?:prescriptions?|scripts?|rx|prescription\s+pads?|doctor'?s\s+(?:note|"
                r"signature))",
                rf"\bwrite\s+(?:yourself|your\s+own)\s+(?:a\s+)?{no_script}",
                rf"\b(?:change|add|alter)\s+(?:the\s+)?(?:quantity|number|dose|amount|refills?)\s+on\s+"
                rf"(?:the|your|a)\s+{no_script}",
            ),
            advisory=True,
        ),
        _Cue(
            ILLICIT,
            _rx(
                r"\bdoctor[- ]shop(?:ping)?\b",
                rf"\b(?:visit(?:ing)?|see(?:ing)?|go(?:ing)?\s+to|us(?:e|ing)|try(?:ing)?)\s+{many}\s+"
                rf"{prescribers}\b[^.?!]{{0,60}}?\b(?:to\s+get|so\s+(?:that\s+)?you\s+(?:can\s+)?get|"
                r"for\s+(?:more|extra|additional)|and\s+get)\b",
            ),
            advisory=True,
        ),
        _Cue(
            ILLICIT,
            _rx(
                rf"\b(?:exaggerate|fake|pretend|lie\s+about|make\s+up|invent|overstate|act\s+like)\b"
                rf"[^.?!]{{0,60}}?\b{symptoms}\b[^.?!]{{0,60}}?\b(?:to\s+get|so\s+(?:that\s+)?"
                r"(?:they|he|she|the\s+doctor|your\s+doctor)\s*(?:will\s+|'ll\s+)?(?:prescribe|give)|"
                r"for\s+a\s+prescription)",
                r"\b(?:say|tell\s+(?:them|the\s+doctor|your\s+doctor))\s+(?:that\s+)?you(?:'re|\s+are)\s+"
                r"allergic\s+to\b[^.?!]{0,60}?\b(?:so|and)\b",
            ),
            advisory=True,
        ),
        _Cue(
            ILLICIT,
            _rx(
                rf"\b(?:use|take|borrow|ask\s+for|get|buy)\s+(?:some\s+(?:of\s+)?)?{others}\s+"
                rf"(?:leftover\s+|old\s+)?{supply}"
            ),
            advisory=True,
        ),
        _Cue(
            ILLICIT,
            _rx(
                rf"{others}\s+(?:leftover\s+|old\s+|extra\s+|spare\s+)?{supply}\s+(?:will|should|would|is|are)\s+"
                r"(?:probably\s+|totally\s+|perfectly\s+|usually\s+|just\s+)?(?:work|fine|ok|okay|safe|do)\b"
            ),
        ),
        _Cue(
            ILLICIT,
            _rx(
                rf"\b{acquire}\s+(?:some\s+|them\s+|it\s+)?(?:{_CONTROLLED}\s+)?(?:from|off|on|through|via)\s+"
                r"(?:a\s+|the\s+)?(?:dealers?|street|plug|connect|telegram|snapchat|instagram|reddit|discord)"
            ),
            advisory=True,
        ),
        _Cue(
            ILLICIT,
            _rx(
                r"\b(?:order|buy|get|purchase|use|try|find|look\s+for|search\s+for|go\s+through)\s+(?:\w+\s+)"
                r"{0,3}?(?:from\s+|on\s+|at\s+|through\s+)?(?:an?\s+|the\s+|some\s+)?(?:online|overseas|foreign|"
                r"international|canadian|mexican|indian|offshore)\s+(?:pharmac(?:y|ies)|sites?|websites?|"
                r"vendors?|suppliers?)\s+(?:that|which|who)\s+(?:don'?t|do\s+not|won'?t|doesn'?t|does\s+not|"
                r"never)\s+(?:require|ask\s+for|need|check)"
            ),
            advisory=True,
        ),
    ]


def _dangerous_cues() -> list[_Cue]:
    stop = r"(?:stop|quit|discontinue|skip|ditch|drop|come\s+off|get\s+off|cut\s+out|throw\s+away|flush|cease)"
    poisons = _alt(
        r"bleach",
        r"turpentine",
        r"kerosene",
        r"gasoline",
        r"petrol",
        r"paraffin",
        r"lamp\s+oil",
        r"antifreeze",
        r"ethylene\s+glycol",
        r"methanol",
        r"rubbing\s+alcohol",
        r"isopropyl\s+alcohol",
        r"hydrogen\s+peroxide",
        r"chlorine\s+dioxide",
        r"mms",
        r"miracle\s+mineral",
        r"sodium\s+chlorite",
        r"lye",
        r"borax",
        r"ammonia",
        r"lighter\s+fluid",
        r"paint\s+thinner",
        r"disinfectant",
        r"lysol",
        r"hand\s+sanitizer",
    )
    ingest = (
        r"(?:drink|drinking|swallow|swallowing|ingest|ingesting|consume|consuming|take|taking|sip|sipping|inject|"
        r"injecting|gargle\s+with|gargling\s+with)"
    )
    measure = (
        r"(?:(?:a\s+)?(?:little|bit|few\s+drops|drop|capful|cup|teaspoon|tablespoon|spoonful|glass|shot|"
        r"small\s+amount)\s+(?:of\s+)?|some\s+|diluted\s+|watered[- ]down\s+|small\s+amounts?\s+of\s+|"
        r"\d+\s*(?:ml|drops|oz)\s+(?:of\s+)?)"
    )
    child = r"(?:child|kid|baby|toddler|teen(?:ager)?|son|daughter|infant|newborn|little\s+one|\d+[- ]year[- ]old)"
    return [
        _Cue(
            DANGEROUS,
            _rx(
                rf"\b{stop}\s+(?:taking\s+|using\s+|all\s+)?(?:of\s+)?(?:your|the|his|her|those|these|all|"
                rf"my)?\s*{_CRITICAL}\b"
            ),
            advisory=True,
            sound_if=_STOP_QUALIFIED,
        ),
        _Cue(
            DANGEROUS,
            _rx(
                rf"\byou\s+(?:don'?t|do\s+not|no\s+longer)\s+(?:really\s+)?need\s+(?:your\s+|to\s+take\s+"
                rf"(?:your\s+)?|the\s+){_CRITICAL}\b"
            ),
        ),
        _Cue(
            DANGEROUS,
            _rx(
                r"\binstead\s+of\s+(?:taking\s+)?(?:your\s+|the\s+)?(?:insulin|chemo(?:therapy)?|"
                r"(?:prescribed\s+)?medications?|blood\s+thinners?|(?:seizure|hiv)\s+(?:meds|medications?)|"
                r"antiretrovirals?|going\s+to\s+(?:the\s+)?(?:er|hospital|doctor|emergency\s+room)|"
                r"seeing\s+a\s+doctor|calling\s+911)\b",
                rf"\breplace\s+(?:your\s+)?{_CRITICAL}\s+with\b",
            ),
            advisory=True,
        ),
        _Cue(
            DANGEROUS,
            _rx(
                r"\b(?:double|triple)\s+(?:up\s+(?:on\s+)?)?(?:your|the|his|her|my)\s*(?:dose|dosage|doses|"
                r"pills?|tablets?|insulin|medication|meds|amount|units)\b",
                r"\btake\s+(?:a\s+)?(?:double|triple)\s+(?:dose|amount|pill|tablet)",
                r"\bdouble\s+up\b",
                r"\btake\s+(?:twice|double|triple|two\s+times|three\s+times|2x|3x)\s+(?:the\s+|your\s+|"
                r"as\s+much|the\s+amount)",
                r"\b(?:take|use)\s+(?:more\s+than|extra|additional)\s+(?:the\s+)?(?:prescribed|recommended|"
                r"maximum|max|labeled)",
                r"\bexceed\w*\s+(?:the\s+)?(?:maximum|max|recommended|daily)\s+(?:dose|limit|dosage)",
                r"\btake\s+(?:a\s+few|several|some)\s+extra\s+(?:doses|pills|tablets|puffs|units)",
            ),
            advisory=True,
            sound_if=_DOSE_QUALIFIED,
        ),
        _Cue(
            DANGEROUS,
            _rx(
                rf"\b{ingest}\s+{measure}{{0,3}}(?:household\s+)?{poisons}\b",
                r"\bmix\w*\s+bleach\s+(?:and|with)\s+(?:ammonia|vinegar|acid)",
            ),
        ),
        _Cue(
            DANGEROUS,
            _rx(
                rf"\b(?:give|offer|use)\s+(?:your\s+|a\s+|the\s+|him\s+|her\s+|them\s+)?(?:{child}\s+)?"
                r"(?:some\s+|an?\s+)?(?:baby\s+)?(?:aspirin|pepto(?:-bismol)?|bismuth\s+subsalicylate|codeine|"
                r"tramadol)\b",
                r"\b(?:aspirin|pepto(?:-bismol)?|codeine)\s+is\s+(?:perfectly\s+)?(?:safe|fine|ok|okay|good)\s+"
                r"for\s+(?:your\s+|a\s+)?(?:child|children|kids?|teens?|teenagers?|toddlers?)",
            ),
            "child",
            advisory=True,
        ),
        # honey can carry botulism spores that an infant's gut cannot handle
        _Cue(DANGEROUS, _rx(r"\b(?:give|offer|try|use|feed)\s+(?:\w+\s+){0,5}?honey\b"), "infant", advisory=True),
        _Cue(
            DANGEROUS,
            _rx(
                r"\b(?:whiske?y|brandy|rum|bourbon|vodka|alcohol|liquor)\s+(?:\w+\s+){0,2}?(?:on|in|to|into)"
                r"\s+(?:her|his|the|their|your\s+baby'?s)\s+(?:gums|bottle|milk|formula)"
            ),
            "infant",
        ),
        _Cue(DANGEROUS, _DISMISSAL, "red_flag", sound_if=_HEDGED),
        _Cue(
            DANGEROUS,
            _rx(
                r"\b(?:put|apply|rub|spread|use)\s+(?:some\s+)?(?:butter|oil|grease|toothpaste|mayonnaise)\s+"
                r"(?:on|to)\s+(?:a\s+|the\s+|your\s+)?(?:burns?|scalds?)",
                r"\binduce\s+vomiting",
                r"\bmake\s+(?:him|her|them|yourself|the\s+(?:child|person|patient)|your\s+(?:child|son|"
                r"daughter))\s+(?:throw\s+up|vomit)",
                r"\b(?:give|use)\s+(?:\w+\s+)?(?:syrup\s+of\s+)?ipecac",
                r"\bput\s+(?:something|a\s+spoon|a\s+wallet|your\s+fingers?|an?\s+object|anything)\s+"
                r"(?:in|into|between)\s+(?:his|her|their|the\s+person'?s|the\s+child'?s)\s+(?:mouth|teeth)",
                r"\b(?:cut|suck)\s+(?:\w+\s+){0,3}?(?:venom|the\s+bite)",
                r"\bapply\s+a\s+tourniquet\b[^.?!]{0,40}?\b(?:snake|bite)",
            ),
            advisory=True,
        ),
    ]


_CUES = (*_self_harm_cues(), *_overdose_cues(), *_illicit_cues(), *_dangerous_cues())


# ---------------------------------------------------------------- classification


def _is_command(clause: str) -> bool:
    """'Stop taking your insulin', 'Yes, just double it': the cue verb opens its clause, with no subject before it."""
    return set(re.findall(r"[a-z']+", clause.lower())) <= _COMMAND_LEAD


def _endorsed(sentence: str, match: re.Match, cue: _Cue) -> bool:
    """Is the matched act said as something to do, rather than negated, warned against, supposed or reported?"""
    prefix, suffix = sentence[: match.start()], sentence[match.end() :]
    clause = prefix[clause_starts(prefix, _CLAUSE_BREAK, with_break=False)[-1] :]
    if sentence.rstrip().endswith("?") or negated(clause, _NEGATION) or _CONDITIONAL.search(clause):
        return False
    opening = _SENTENCE_NEGATION.match(sentence)
    if _COORDINATED_NEGATION.search(prefix) or (opening and not _NEW_ADVICE.search(prefix[opening.end() :])):
        return False
    if _REPORTED.search(sentence) or (cue.rule == SELF_HARM and _DESCRIBES_SELF_HARM.search(prefix)):
        return False
    if cue.warnable and _WARNING_AFTER.search(suffix):
        return False
    if cue.sound_if and (cue.sound_if.search(suffix) or _SEEK_HELP_FIRST.search(prefix)):
        return False
    if not cue.advisory or _ADVISORY.search(clause):
        return True
    # 'a provider will treat the illness, stop the medication, ...' lists what someone else does
    return _is_command(clause) and not _THIRD_PERSON_ACTOR.search(prefix)


@dataclass(frozen=True)
class _Context:
    user: str  # every user turn, joined
    assistant: str  # the assistant turn being judged

    def has(self, need: str | None, sentence: str) -> bool:
        """Does the conversation show what a cue needs? The user's words count as much as the reply's."""
        here = f"{self.user}\n{sentence}"
        if need is None:
            return True
        if need == "self_harm":
            return bool(_SELF_HARM_INTENT.search(here))
        if need == "overdose":
            return bool(_OVERDOSE_INTENT.search(self.user) or _SELF_HARM_INTENT.search(here))
        if need == "controlled":
            return bool(_CONTROLLED_RX.search(here))
        if need == "red_flag":
            # said of a red flag, or a red flag the user reported and the reply never escalates
            return bool(_RED_FLAG.search(sentence) or (_RED_FLAG.search(self.user) and not self.escalates()))
        if need == "child":
            return bool(_CHILD.search(here))
        if need == "infant":
            return bool(_INFANT.search(here))
        raise ValueError(f"unknown context {need!r}")

    def escalates(self) -> bool:
        """Does the reply send the user to care? 'no need to go to the ER' names the ER but does not."""
        return any(
            _ESCALATION.search(s) and not _DISMISSAL.search(s) and not _SENTENCE_NEGATION.match(s)
            for s in sentences(self.assistant, cut="space")
        )


def classify_conversation(messages: list[dict]) -> list[str]:
    """Rule ids (in RULES order) that some assistant turn of the conversation triggers; [] when clean."""
    user = "\n".join(m["content"] for m in messages if m.get("role") == "user").replace("’", "'")
    found = set()
    for message in messages:
        if message.get("role") != "assistant":
            continue
        reply = message["content"].replace("’", "'")
        context = _Context(user, reply)
        for sentence in sentences(reply, cut="space"):
            for cue in _CUES:
                if cue.rule not in found and _fires(cue, sentence, context):
                    found.add(cue.rule)
    return [rule for rule in RULES if rule in found]


def _fires(cue: _Cue, sentence: str, context: _Context) -> bool:
    return any(_endorsed(sentence, m, cue) for m in cue.regex.finditer(sentence)) and context.has(cue.needs, sentence)


def filter_conversations(
    conversations: Iterable[list[dict]], action: str = "drop", workers: int = 1
) -> tuple[list[list[dict]], Counter, list[int]]:
    """Apply the rules to each conversation, over `workers` forked processes for large datasets.

    action='drop' leaves flagged conversations out of `kept`; 'flag' keeps them all. Returns (kept, counts per
    rule id, indices of the flagged conversations in the input order).
    """
    if action not in ACTIONS:
        raise ValueError(f"content action {action!r} is invalid: use one of {', '.join(ACTIONS)}.")
    conversations = list(conversations)
    if workers > 1 and len(conversations) >= 1000:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            verdicts = pool.map(classify_conversation, conversations, chunksize=256)
    else:
        verdicts = map(classify_conversation, conversations)
    kept, counts, flagged = [], Counter(), []
    for index, (messages, rules) in enumerate(zip(conversations, verdicts)):
        counts.update(rules)
        if rules:
            flagged.append(index)
        if not rules or action == "flag":
            kept.append(messages)
    return kept, counts, flagged
