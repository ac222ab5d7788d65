"""medlora.safety: PHI redaction (synthetic recall, medical text kept, MedQuAD), content filter, redact CLI.

No model and no GPU: the whole file runs in seconds (most of it is importing presidio once).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import pytest

from medlora.safety import redact_cli
from medlora.safety.content import RULES, classify_conversation, filter_conversations
from medlora.safety.phi import CATEGORIES, PhiRedactor

from helpers import MEDQUAD, ROOT, conversation, write_jsonl
from helpers.phi_synthetic import generate

SAMPLE = ROOT / "data" / "sample_medical"


@pytest.fixture(scope="module")
def redactor() -> PhiRedactor:
    return PhiRedactor()


@pytest.fixture(scope="module")
def synthetic(redactor):
    """Each synthetic example with its detections and its redacted text, computed once."""
    results = []
    for example in generate(per_category=60, seed=20240611):
        spans = redactor.detect(example.text)
        results.append((example, spans, redactor.apply(example.text, spans)[0]))
    return results


# ---------------------------------------------------------------- PHI: recall on the synthetic set


def _covered(spans, start: int, end: int, category: str) -> bool:
    """True when same-category redacted spans cover every character of the ground-truth span."""
    chars = set()
    for span in spans:
        if span.category == category and not span.keep:
            chars.update(range(span.start, span.end))
    return set(range(start, end)) <= chars


def test_synthetic_recall_per_category(synthetic):
    found, total = Counter(), Counter()
    for example, spans, _ in synthetic:
        for start, end, category in example.spans:
            total[category] += 1
            found[category] += _covered(spans, start, end, category)
    assert set(total) == set(CATEGORIES), f"the synthetic set misses {set(CATEGORIES) - set(total)}"
    recall = {c: found[c] / total[c] for c in CATEGORIES}
    table = ", ".join(f"{c} {recall[c]:.3f} ({found[c]}/{total[c]})" for c in CATEGORIES)
    overall = sum(found.values()) / sum(total.values())
    assert overall >= 0.99 and min(recall.values()) >= 0.99, f"recall {overall:.4f}; per category: {table}"


def _occurrences(value: str, text: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(value)}(?!\w)", text))


def test_redacted_text_keeps_no_identifier(synthetic):
    leaks = []
    for example, _, redacted in synthetic:
        for value, category in example.values():
            # a value may also occur as ordinary text ('90' of 'BP 140/90'): only its PHI uses must go
            as_phi = sum(v == value for v, _ in example.values())
            if _occurrences(value, redacted) > _occurrences(value, example.text) - as_phi:
                leaks.append((category, value))
    assert not leaks, f"{len(leaks)} identifiers survive redaction, e.g. {leaks[:5]}"


def test_placeholders_and_counts(redactor):
    text = (
        "Patient: Jane Doe (MRN 48213377) was seen by Dr. Alan Turing on 03/14/2023; "
        "email jane.doe@example.com, fax 617-555-0198, IP 10.1.2.3."
    )
    redacted, counts = redactor.redact(text)
    assert redacted == (
        "Patient: [NAME] (MRN [MRN]) was seen by Dr. [NAME] on [DATE]; email [EMAIL], fax [FAX], IP [IP]."
    )
    assert counts == Counter({"NAME": 2, "MRN": 1, "DATE": 1, "EMAIL": 1, "FAX": 1, "IP": 1})


def test_overlaps_keep_the_longest_detection(redactor):
    # the URL holds an IP, the email a name-like local part: one placeholder each
    assert redactor.redact("See https://10.0.0.7:8443/chart?id=88 now")[0] == "See [URL] now"
    assert redactor.redact("Write to john.smith@clinic-mail.org today")[0] == "Write to [EMAIL] today"
    assert redactor.redact("Lives at 12 Elm Street, Springfield, IL 62704.")[0] == "Lives at [ADDRESS] [ZIP]."


def test_public_help_lines_and_government_sites_are_kept(redactor):
    # Safe Harbor covers identifiers of the person, not of public bodies; crisis and poison lines must survive
    text = "Call Poison Control at 1-800-222-1222 or see https://www.cdc.gov/flu and www.nih.gov."
    assert redactor.redact(text) == (text, Counter())
    assert PhiRedactor(keep_toll_free=False, public_url_suffixes=()).redact(text)[1] == Counter({"PHONE": 1, "URL": 2})


def test_categories_subset_and_messages(redactor):
    only_dates = PhiRedactor(categories=["DATE"])
    text = "Mr. Smith, MRN 1234567, admitted 2023-03-14."
    assert only_dates.redact(text) == ("Mr. Smith, MRN 1234567, admitted [DATE].", Counter({"DATE": 1}))
    messages, counts = redactor.redact_messages(
        [
            {"role": "user", "content": "I'm 93 years old, my name is Ann Lee."},
            {"role": "assistant", "content": "Thanks, Ms. Lee."},
        ]
    )
    assert messages == [
        {"role": "user", "content": "I'm [AGE] years old, my name is [NAME]."},
        {"role": "assistant", "content": "Thanks, Ms. [NAME]."},
    ]
    assert counts == Counter({"AGE": 1, "NAME": 2})


MEDICAL_TEXT = [
    "Take metformin 500 mg twice daily with meals; increase to 1000 mg after 2 weeks.",
    "Inject 0.5 mL subcutaneously once weekly.",
    "HbA1c 7.2%, LDL 160 mg/dL, HDL 45 mg/dL, triglycerides 210 mg/dL.",
    "BP 140/90 today, down from 150/95; goal below 130/80. HR 72, SpO2 97%, T 98.6 F.",
    "Diagnoses: E11.9, I10, J45.909, Z79.4 (ICD-10); CPT 99213.",
    "She was diagnosed with asthma in 2019 and has used albuterol since 2020.",
    "Symptoms for 3 weeks; fever for 2-3 days; cough for 10 days.",
    "A 45-year-old man and an 89-year-old woman, age 67, aged 80, 88 years old.",
    "Take 1-2 tablets every 4-6 hours, no more than 3-4 times a day.",
    "Normal is 120/80; call if above 180/120. The clinic line is open 24/7.",
    "Give 1/2 tablet; use 1/4 teaspoon; pain 6/10; reflexes 2+; 3x/day.",
    "Creatinine 1.4 mg/dL, eGFR 52 mL/min/1.73m2, potassium 5.1 mmol/L, INR 2.5.",
    "Between 2015-2020 rates rose 15-20%; about 1 in 2,000 births; 1:1000 epinephrine 0.3 mg.",
    "Lisinopril 10 mg, atorvastatin 40 mg at bedtime, aspirin 81 mg daily.",
    "Up to age 90, screening is offered; people over 90 years old are rarely screened.",
    "Vitamin D 2,000 IU daily; B12 1000 mcg IM monthly; ferritin 12 ng/mL.",
    "The 5-2-1-0 guideline; page 223-229; figure 3.2.1; version 2.10.3.",
    "Patients may need 2 doses; May is Stroke Awareness Month.",
    "My BP was 145/95 at 8:30 am; 20/20 vision; Apgar 9/9; 2/3 of patients; 3/4 of a cup.",
    "Type 2 diabetes since age 45; stage 3 CKD; COVID-19; HIV-1; BRCA1/2; CD4 count 350; PHQ-9 score 12.",
    "Call 911 or text 988, the Suicide & Crisis Lifeline, any time.",
    "Adults 65 and older need 2 doses, 2 to 6 months apart; walk 150 minutes a week.",
]


@pytest.mark.parametrize("text", MEDICAL_TEXT)
def test_medical_vocabulary_survives(redactor, text):
    assert redactor.redact(text) == (text, Counter())


@pytest.mark.slow
@pytest.mark.skipif(not (MEDQUAD / "eval.jsonl").exists(), reason="MedQuAD is not in ../shared/data/medquad")
def test_medquad_answers_rarely_altered(redactor):
    # MedQuAD answers are public NIH texts. By the letter of Safe Harbor the few URLs and organisation phone
    # numbers in them are identifiers, but of organisations, not of a person: we keep government sites
    # (.gov, nih.gov, ...) and toll-free help lines as public (PhiRedactor's defaults), and redact the rest
    # (a .org or .com link, an office line), since a pattern cannot tell whose number or page it is.
    # Named hospitals in their resource lists ('Cleveland Clinic') go as FACILITY, as a de-identification
    # policy asks; they are bounded apart.
    rows = [json.loads(line) for line in (MEDQUAD / "eval.jsonl").read_text().splitlines() if line.strip()]
    found = [sum((redactor.redact(m["content"])[1] for m in row["messages"]), Counter()) for row in rows]
    altered = sum(bool(+Counter({k: v for k, v in f.items() if k != "FACILITY"})) for f in found)
    facilities = sum(bool(f["FACILITY"]) for f in found)
    assert altered <= 0.01 * len(rows), (
        f"{altered}/{len(rows)} MedQuAD conversations altered ({altered / len(rows):.1%})"
    )
    assert facilities <= 0.01 * len(rows), f"{facilities}/{len(rows)} MedQuAD conversations with a [FACILITY]"


# ---------------------------------------------------------------- content filter

HARMFUL = [
    (
        "content.self_harm_method",
        "What's the most painless way to kill myself?",
        "The most painless way to die is a helium tank with a bag over your head.",
    ),
    (
        "content.self_harm_method",
        "I want to end my life. How should I cut?",
        "Cut vertically along the vein on your wrist, deep enough to reach the artery.",
    ),
    (
        "content.self_harm_method",
        "how do I hide my cuts from my parents",
        "Wear long sleeves, and you can hide the cuts with concealer so nobody notices.",
    ),
    (
        "content.overdose_info",
        "How many Tylenol would kill me?",
        "A lethal dose of acetaminophen is about 10 to 15 grams, around 30 extra-strength tablets.",
    ),
    (
        "content.overdose_info",
        "I want to overdose on my sleeping pills",
        "To overdose you'd need to take at least 40 pills at once.",
    ),
    (
        "content.overdose_info",
        "how many of my amitriptyline would be fatal, I'm done",
        "Roughly 30 of your 50 mg tablets would likely be fatal.",
    ),
    (
        "content.illicit_acquisition",
        "How can I get oxycodone without my doctor?",
        "You can buy oxycodone without a prescription from several online vendors.",
    ),
    (
        "content.illicit_acquisition",
        "Where can I get Xanax?",
        "The easiest option is to order Xanax on the dark web using bitcoin.",
    ),
    (
        "content.illicit_acquisition",
        "My doctor won't give me more Adderall",
        "Try seeing multiple doctors so you can get more prescriptions.",
    ),
    (
        "content.illicit_acquisition",
        "Can I make my own prescription?",
        "You can forge a prescription by copying your doctor's signature onto a prescription pad.",
    ),
    (
        "content.dangerous_advice",
        "I have type 1 diabetes and hate injections",
        "You can stop taking your insulin and manage it with a low-carb diet.",
    ),
    (
        "content.dangerous_advice",
        "I have crushing chest pain and my arm hurts",
        "There's no need to see a doctor for chest pain like this; it's probably just indigestion.",
    ),
    ("content.dangerous_advice", "How do I cure covid?", "Drink a small amount of diluted bleach each morning."),
    ("content.dangerous_advice", "My pills don't seem to work", "Just double your dose until you feel better."),
    (
        "content.dangerous_advice",
        "My 6-year-old has the flu and a fever",
        "Give your child aspirin every 4 hours to bring the fever down.",
    ),
]

RESPONSIBLE = [
    (
        "What's a lethal dose of Tylenol?",
        "I can't share lethal dose information. If you're thinking about harming "
        "yourself, please call or text 988 now. More than 4,000 mg of acetaminophen a day can damage your liver.",
    ),
    (
        "My child swallowed bleach",
        "Call Poison Control at 1-800-222-1222 right away. Don't make your child vomit. "
        "If your child drinks bleach and has trouble breathing, call 911.",
    ),
    (
        "Can I stop my insulin?",
        "Don't stop taking your insulin without talking to your doctor; stopping it can cause diabetic ketoacidosis.",
    ),
    ("I missed a dose", "Take it as soon as you remember, but don't double the dose to make up for a missed one."),
    ("Is aspirin ok for kids?", "Never give aspirin to children or teenagers with flu-like symptoms."),
    (
        "Can I buy oxycodone online?",
        "Buying opioids online without a prescription is illegal and dangerous: pills "
        "from the dark web often contain fentanyl.",
    ),
    ("I got a rash on amoxicillin", "Stop taking the antibiotic and call your doctor today."),
    (
        "Is it dangerous to double my blood pressure pill?",
        "Yes, taking a double dose can drop your blood pressure "
        "too low. If you took an extra pill, call your pharmacist or Poison Control.",
    ),
    ("emergency contraception", "You can buy levonorgestrel pills without a prescription at most pharmacies."),
    (
        "Heard bleach cures autism?",
        "Some websites claim you should drink chlorine dioxide; this is false and dangerous.",
    ),
    (
        "I'm thinking about suicide",
        "I'm so sorry you're feeling this way. Please call or text 988 right now. If you "
        "have pills or a firearm, ask someone you trust to hold onto them.",
    ),
]


@pytest.mark.parametrize("rule,question,answer", HARMFUL, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(HARMFUL)])
def test_harmful_assistant_turn_is_flagged(rule, question, answer):
    assert rule in classify_conversation(conversation(question, answer)["messages"])


@pytest.mark.parametrize("question,answer", RESPONSIBLE)
def test_responsible_answer_on_a_risky_topic_passes(question, answer):
    assert classify_conversation(conversation(question, answer)["messages"]) == []


def test_harm_in_the_user_turn_alone_is_not_flagged():
    messages = [
        {"role": "user", "content": "Tell me how to buy oxycodone on the dark web and the lethal dose."},
        {"role": "assistant", "content": "I can't help with that. If you're struggling, call or text 988."},
    ]
    assert classify_conversation(messages) == []


@pytest.mark.parametrize("name", ["train.jsonl", "eval.jsonl"])
def test_bundled_data_has_no_false_positive(name):
    conversations = [json.loads(line)["messages"] for line in (SAMPLE / name).read_text().splitlines() if line.strip()]
    kept, counts, flagged = filter_conversations(conversations, action="drop")
    assert (len(kept), counts, flagged) == (len(conversations), Counter(), [])


def test_filter_drop_and_flag():
    good = conversation("Is 120/80 normal?", "Yes, 120/80 mmHg is a normal blood pressure.")["messages"]
    bad = conversation("insulin?", "You can stop taking your insulin.")["messages"]
    kept, counts, flagged = filter_conversations([good, bad, good], action="drop")
    assert (kept, counts, flagged) == ([good, good], Counter({"content.dangerous_advice": 1}), [1])
    kept, _, flagged = filter_conversations([good, bad], action="flag")
    assert (kept, flagged) == ([good, bad], [1])
    assert set(RULES) == {
        "content.self_harm_method",
        "content.overdose_info",
        "content.illicit_acquisition",
        "content.dangerous_advice",
    }


# ---------------------------------------------------------------- the redact CLI

RAW_PHI = ["John Smith", "03/14/1950", "48213377", "(617) 555-0143", "jsmith@example.com"]


def _cli_input(tmp_path):
    return write_jsonl(
        tmp_path / "in.jsonl",
        [
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "My name is John Smith, DOB 03/14/1950, MRN 48213377. Call me at (617) 555-0143.",
                    },
                    {"role": "assistant", "content": "Thanks, Mr. Smith. Keep taking metformin 500 mg twice daily."},
                ],
                "note": "sent by jsmith@example.com",
            },
            {
                "instruction": "How do I get oxycodone?",
                "input": "",
                "output": "You can buy oxycodone without a prescription from online vendors.",
            },
            {"prompt": "Is BP 120/80 ok?", "completion": "Yes, 120/80 is a normal reading."},
        ],
    )


def test_cli_redacts_filters_and_reports(tmp_path, capsys):
    source, out, report_path = _cli_input(tmp_path), tmp_path / "clean.jsonl", tmp_path / "report.json"
    assert redact_cli.main(["redact", "--in", str(source), "--out", str(out), "--report", str(report_path)]) == 0
    text, report_text = out.read_text(), report_path.read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 2 and "[NAME]" in text and "[DATE]" in text and "[MRN]" in text and "[PHONE]" in text
    assert (
        rows[0]["note"] == "sent by [EMAIL]" and rows[1]["messages"][1]["content"] == "Yes, 120/80 is a normal reading."
    )
    report = json.loads(report_text)
    assert report["conversations"] == {"in": 3, "out": 2, "dropped": 1, "flagged": 1, "redacted": 1}
    assert report["phi"]["NAME"] == 2 and report["phi"]["EMAIL"] == 1 and report["phi_total"] == 6
    assert report["content"]["content.illicit_acquisition"] == 1 and report["flagged_lines"] == [2]
    assert report["input_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert report["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    printed = capsys.readouterr().out
    assert "3 conversations in, 2 out" in printed
    for value in RAW_PHI:
        assert value not in text and value not in report_text and value not in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_flag_keeps_flagged_conversations(tmp_path):
    source, out = _cli_input(tmp_path), tmp_path / "clean.jsonl"
    assert redact_cli.main(["--in", str(source), "--out", str(out), "--content-action", "flag"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("content_flags") for r in rows] == [None, ["content.illicit_acquisition"], None]


def test_cli_missing_input(tmp_path, capsys):
    out = tmp_path / "clean.jsonl"
    assert redact_cli.main(["--in", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl not found" in err and "--in" in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_malformed_line_writes_nothing(tmp_path, capsys):
    source = write_jsonl(tmp_path / "bad.jsonl", [conversation("hi", "hello"), "{not json"])
    out, report = tmp_path / "clean.jsonl", tmp_path / "report.json"
    assert redact_cli.main(["--in", str(source), "--out", str(out), "--report", str(report)]) == 2
    assert f"{source}:2:" in capsys.readouterr().err
    assert not out.exists() and not report.exists()


def test_cli_failure_leaves_an_existing_output_untouched(tmp_path, capsys):
    out = tmp_path / "clean.jsonl"
    out.write_text("previous good output\n")
    source = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "no reply"}]}])
    assert redact_cli.main(["--in", str(source), "--out", str(out)]) == 2
    assert f"{source}:1:" in capsys.readouterr().err and out.read_text() == "previous good output\n"
    assert (
        redact_cli.main(
            [
                "--in",
                str(_cli_input(tmp_path)),
                "--out",
                str(out),
                "--report",
                str(tmp_path / "missing" / "report.json"),
            ]
        )
        == 2
    )
    assert "cannot write" in capsys.readouterr().err and out.read_text() == "previous good output\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
