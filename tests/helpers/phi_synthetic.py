"""A seeded synthetic PHI test set: realistic clinical sentences carrying every Safe Harbor category that text
can hold, in varied formats, with ground-truth (start, end, category) spans.

`generate(per_category, seed)` is deterministic for a given seed. Templates hold `{SLOT}` markers; each slot is
filled by a value generator and recorded as one span of the slot's category. The text around it is dense with
medical vocabulary (doses, lab values, BP readings, ICD codes) that must survive redaction.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from dataclasses import dataclass, field

from medlora.safety.phi import vin_check_digit

FIRST = [
    "John",
    "Maria",
    "Wei",
    "Aisha",
    "Robert",
    "Emily",
    "José",
    "Olga",
    "Tyrone",
    "Priya",
    "Liam",
    "Fatima",
    "Hannah",
    "Mohammed",
    "Chloe",
    "Dmitri",
    "Grace",
    "Kwame",
    "Sofia",
    "Ethan",
    "Mei",
    "Carlos",
    "Ingrid",
    "Noah",
    "Zara",
    "Benjamin",
    "Amara",
    "Lucas",
    "Yuki",
    "Isabella",
    "DeShawn",
    "Siobhan",
]
LAST = [
    "Smith",
    "Garcia",
    "Nguyen",
    "O'Brien",
    "McAllister",
    "Patel",
    "Kowalski",
    "Johnson",
    "Okafor",
    "Schmidt",
    "Rossi",
    "Haddad",
    "Fernández",
    "Williams",
    "Chen",
    "Anderson",
    "Ivanova",
    "Brown",
    "Kim",
    "Thompson",
    "Moreau",
    "Lindqvist",
    "Abernathy",
    "Whitfield",
    "Castillo",
    "Baptiste",
    "Delacroix",
    "Hughes",
    "Nakamura",
    "Smith-Jones",
    "MacLeod",
    "Oyelaran",
]
STREETS = [
    "Oak",
    "Maple",
    "Elm",
    "Washington",
    "Lincoln",
    "Cedar",
    "Lakeview",
    "Sunset",
    "Highland",
    "Park",
    "Mill Creek",
    "Pine Ridge",
    "Martin Luther King Jr",
    "5th",
    "42nd",
    "Old Mill",
    "Anderson",
    "Willow Bend",
]
SUFFIXES = [
    "Street",
    "St.",
    "Avenue",
    "Ave",
    "Road",
    "Rd.",
    "Boulevard",
    "Blvd",
    "Lane",
    "Drive",
    "Dr.",
    "Court",
    "Way",
    "Place",
    "Terrace",
    "Circle",
    "Parkway",
    "Crossing",
    "Trail",
    "Hwy",
]
CITIES = [
    ("Springfield", "IL"),
    ("Boston", "MA"),
    ("Austin", "TX"),
    ("San Diego", "CA"),
    ("Portland", "OR"),
    ("Columbus", "OH"),
    ("Raleigh", "NC"),
    ("Madison", "WI"),
    ("Tucson", "AZ"),
    ("Albany", "NY"),
    ("Burlington", "VT"),
    ("Boise", "ID"),
    ("Dayton", "Ohio"),
    ("Sioux Falls", "South Dakota"),
]
DOMAINS = [
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "example.org",
    "mail.stjudeclinic.com",
    "hotmail.co.uk",
    "protonmail.com",
    "northside-health.net",
]
AREA = [201, 212, 213, 305, 312, 404, 415, 503, 512, 617, 646, 702, 713, 720, 773, 802, 857, 917, 919, 971]
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: as on plates and VINs

CLINICAL = [
    "Metformin 500 mg twice daily was continued.",
    "HbA1c 7.2%, LDL 160 mg/dL.",
    "BP 140/90, HR 88.",
    "Assessment: E11.9, I10.",
    "Take 1-2 tablets 3-4 times a day.",
    "Symptoms for 3 weeks.",
    "BP 120/80 on lisinopril 10 mg.",
    "Diagnosed with asthma in 2019.",
    "Albuterol 2 puffs q4h prn.",
    "Creatinine 1.4 mg/dL, eGFR 52.",
    "Start amoxicillin 875 mg BID for 10 days.",
    "Pain 6/10.",
    "",
]


@dataclass
class Example:
    text: str
    spans: list[tuple[int, int, str]] = field(default_factory=list)

    def values(self) -> list[tuple[str, str]]:
        return [(self.text[s:e], c) for s, e, c in self.spans]


class _Values:
    """Random values for each slot, in the formats people actually write."""

    def __init__(self, rng: random.Random):
        self.r = rng

    def pick(self, *options: str) -> str:
        return self.r.choice(options)

    def digits(self, n: int) -> str:
        return "".join(self.r.choice("0123456789") for _ in range(n))

    def letters(self, n: int, alphabet: str = LETTERS) -> str:
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def alnum(self, n: int) -> str:
        return self.letters(n, LETTERS + "0123456789")

    def first(self) -> str:
        return self.r.choice(FIRST)

    def last(self) -> str:
        return self.r.choice(LAST)

    def full(self) -> str:
        middle = self.r.choice("ABCDEFGHJKLMRSTW")
        return self.pick(
            f"{self.first()} {self.last()}", f"{self.first()} {self.last()}", f"{self.first()} {middle}. {self.last()}"
        )

    def last_first(self) -> str:
        return f"{self.last()}, {self.first()}"

    def date(self) -> str:
        d = dt.date(1935, 1, 1) + dt.timedelta(days=self.r.randrange(33000))
        nth = f"{d.day}{ {1: 'st', 2: 'nd', 3: 'rd', 21: 'st', 22: 'nd', 23: 'rd', 31: 'st'}.get(d.day, 'th') }"
        return self.pick(
            f"{d.month:02d}/{d.day:02d}/{d.year}",
            f"{d.month}/{d.day}/{d.year % 100:02d}",
            d.isoformat(),
            f"{d:%B} {d.day}, {d.year}",
            f"{d:%b} {d.day}, {d.year}",
            f"{d.day} {d:%b} {d.year}",
            f"{d.day} {d:%B} {d.year}",
            f"{d:%B} {d.day}",
            f"the {nth} of {d:%B}",
            f"{d:%b}. {d.day}, {d.year}",
            f"{d.day:02d}.{d.month:02d}.{d.year}",
            f"{d.month:02d}-{d.day:02d}-{d.year}",
            f"{d:%B} {d.year}",
            f"{d:%A}, {d:%B} {d.day}, {d.year}",
            f"{d.day:02d}-{d:%b}-{d.year}",
            f"{d:%B} {nth}, {d.year}",
            f"{d.year}/{d.month:02d}/{d.day:02d}",
            f"{d.day}/{d.month}/{d.year}",
            f"{d:%b} {d.day}",
            f"{nth} {d:%B} {d.year}",
        )

    def age(self) -> str:
        return str(self.r.randint(90, 112))

    def phone(self) -> str:
        a, x, n = self.r.choice(AREA), self.r.randint(201, 989), self.digits(4)
        return self.pick(
            f"({a}) {x}-{n}",
            f"{a}-{x}-{n}",
            f"{a}.{x}.{n}",
            f"+1 {a} {x} {n}",
            f"1-{a}-{x}-{n}",
            f"{a} {x} {n}",
            f"{a}-{x}-{n} ext. {self.r.randint(2, 9999)}",
            f"({a}) 555-01{self.digits(2)}",
            f"+1 ({a}) {x}-{n}",
            f"({a}){x}-{n}x{self.r.randint(10, 999)}",
            f"001-{a}-{x}-{n}",
            f"+1-{a}-{x}-{n}",
            f"+44 20 7946 0{self.digits(3)}",
            f"+44 7700 900{self.digits(3)}",
            f"+49 30 {self.digits(7)}",
            f"+33 1 42 68 {self.digits(2)} {self.digits(2)}",
            f"+61 2 9{self.digits(3)} {self.digits(4)}",
        )

    def email(self) -> str:
        f = self.first().lower().replace("é", "e")
        last = re.sub(r"\W", "", self.last().lower().replace("á", "a"))
        local = self.pick(
            f"{f}.{last}",
            f"{f[0]}{last}{self.r.randint(1, 99)}",
            f"{last}_{f}",
            f"{f}{self.r.randint(1950, 2005)}",
            f"{f}.{last}+health",
        )
        return f"{local}@{self.r.choice(DOMAINS)}"

    def ssn(self) -> str:
        area = self.r.choice([n for n in range(1, 900) if n != 666])
        a, g, s = f"{area:03d}", f"{self.r.randint(1, 99):02d}", f"{self.r.randint(1, 9999):04d}"
        return self.pick(f"{a}-{g}-{s}", f"{a} {g} {s}", f"{a}{g}{s}")

    def mrn(self) -> str:
        return self.pick(
            self.digits(8),
            self.digits(7),
            f"{self.digits(3)}-{self.digits(5)}",
            f"A{self.digits(7)}",
            f"MR{self.digits(6)}",
            self.digits(10),
            f"MRN-{self.digits(6)}",
        )

    def plan(self) -> str:
        return self.pick(
            f"{self.letters(3)}{self.digits(6)}",
            f"W{self.digits(9)}",
            f"XGH{self.digits(9)}",
            f"{self.digits(1)}{self.alnum(3)}-{self.alnum(3)}-{self.alnum(4)}",
            f"{self.digits(2)}-{self.digits(4)}-{self.letters(1)}",
            self.digits(5),
            f"HP-{self.digits(9)}",
        )

    def account(self) -> str:
        return self.pick(
            self.digits(10),
            f"{self.digits(4)}-{self.digits(4)}-{self.digits(2)}",
            self.digits(12),
            f"AC-{self.digits(7)}",
            self.digits(4),
        )

    def license(self) -> str:
        return self.pick(
            f"{self.letters(1)}{self.digits(7)}",
            f"S{self.digits(3)}-{self.digits(4)}-{self.digits(4)}",
            f"RN-{self.digits(6)}",
            f"{self.letters(2, 'ABFGM')}{self.digits(7)}",
            f"MD{self.digits(5)}",
            self.digits(10),
            f"{self.digits(3)}-{self.digits(3)}-{self.digits(3)}",
        )

    def vin(self) -> str:
        body = self.alnum(17)
        return body[:8] + vin_check_digit(body) + body[9:]

    def plate(self) -> str:
        return self.pick(
            f"{self.digits(1)}{self.letters(3)}{self.digits(3)}",
            f"{self.letters(3)}-{self.digits(4)}",
            f"{self.letters(3)} {self.digits(4)}",
            f"{self.letters(2)}{self.digits(2)} {self.letters(3)}",
        )

    def device(self) -> str:
        return self.pick(
            f"PM-{self.digits(5)}-{self.letters(1, 'XYZ')}",
            f"SN{self.digits(7)}",
            f"{self.alnum(4)}-{self.digits(4)}",
            f"DX{self.digits(2)}{self.alnum(6)}",
            f"{self.digits(3)}{self.letters(2, 'KLMN')}{self.digits(5)}",
        )

    def mac(self) -> str:
        return ":".join(f"{self.r.randrange(256):02X}" for _ in range(6))

    def url(self) -> str:
        f = self.first().lower().replace("é", "e")
        last = re.sub(r"\W", "", self.last().lower().replace("á", "a"))
        host = ".".join(str(self.r.randint(10, 250)) for _ in range(3)) + ".7"
        return self.pick(
            f"https://portal.stmarys-hospital.org/patients/{self.digits(5)}",
            f"http://www.{last}family.com/{f}-surgery-diary",
            f"www.facebook.com/{f}.{last}.{self.digits(1)}",
            f"https://{host}:8443/chart?id={self.digits(4)}",
            f"{last}{f}.blogspot.com",
            f"https://mychart.northside-health.net/visit/{self.alnum(8)}",
            f"https://www.instagram.com/{f}_{last}/",
            f"http://drive.example.com/share/{self.alnum(10)}?u={f}",
        )

    def ipv4(self) -> str:
        return ".".join(str(self.r.randint(1, 254)) for _ in range(4))

    def ipv6(self) -> str:
        g = [f"{self.r.randrange(65536):x}" for _ in range(8)]
        return self.pick(":".join(g), f"{g[0]}:{g[1]}::{g[7]}", f"fe80::{g[5]}:{g[6]}", f"2001:db8:{g[2]}::{g[7]}")

    def street(self) -> str:
        number = self.pick(str(self.r.randint(1, 9999)), str(self.r.randint(10, 99999)), f"{self.r.randint(1, 999)}B")
        direction = self.pick("", "", "N. ", "South ", "W ")
        unit = self.pick(
            "",
            "",
            f", Apt {self.r.randint(1, 40)}{self.r.choice('ABC')}",
            f", Suite {self.r.randint(100, 900)}",
            f" #{self.r.randint(1, 300)}",
        )
        return f"{number} {direction}{self.r.choice(STREETS)} {self.r.choice(SUFFIXES)}{unit}"

    def city_state(self) -> str:
        return ", ".join(self.r.choice(CITIES))

    def po_box(self) -> str:
        return self.pick(f"P.O. Box {self.r.randint(10, 99999)}", f"PO Box {self.r.randint(10, 9999)}")

    def town(self) -> str:
        return self.r.choice(TOWNS)

    def facility(self) -> str:
        return f"{self.r.choice(FACILITY_NAMES)} {self.r.choice(FACILITY_NOUNS)}"

    def zip(self) -> str:
        return self.pick(f"{self.r.randint(1000, 99999):05d}", f"{self.r.randint(1000, 99999):05d}-{self.digits(4)}")


# {SLOT} -> (category, value method). One slot is one span.
SLOTS = {
    "FULL": ("NAME", "full"),
    "LAST": ("NAME", "last"),
    "FIRST": ("NAME", "first"),
    "LASTFIRST": ("NAME", "last_first"),
    "DATE": ("DATE", "date"),
    "AGE": ("AGE", "age"),
    "PHONE": ("PHONE", "phone"),
    "FAX": ("FAX", "phone"),
    "EMAIL": ("EMAIL", "email"),
    "SSN": ("SSN", "ssn"),
    "MRN": ("MRN", "mrn"),
    "PLAN": ("HEALTH_PLAN", "plan"),
    "ACCOUNT": ("ACCOUNT", "account"),
    "LICENSE": ("LICENSE", "license"),
    "VIN": ("VEHICLE", "vin"),
    "PLATE": ("VEHICLE", "plate"),
    "DEVICE": ("DEVICE", "device"),
    "MAC": ("DEVICE", "mac"),
    "URL": ("URL", "url"),
    "IPV4": ("IP", "ipv4"),
    "IPV6": ("IP", "ipv6"),
    "STREET": ("ADDRESS", "street"),
    "CITYSTATE": ("ADDRESS", "city_state"),
    "POBOX": ("ADDRESS", "po_box"),
    "ZIP": ("ZIP", "zip"),
    "TOWN": ("LOCATION", "town"),
    "FACILITY": ("FACILITY", "facility"),
}
TOWNS = [
    "Dayton",
    "Pawtucket",
    "Erie",
    "Waukegan",
    "Tempe",
    "Scranton",
    "Ypsilanti",
    "Bangor",
    "Lowell",
    "Duluth",
    "Boise",
    "Fresno",
    "Yonkers",
    "Modesto",
    "Cuyahoga Falls",
    "Baton Rouge",
    "Garden Grove",
    "Dearborn Heights",
]
FACILITY_NAMES = [
    "Mercy General",
    "St. Luke's",
    "Maplewood",
    "Riverside",
    "Golden Oaks",
    "Lakeview",
    "Holy Cross",
    "Brookhaven",
    "Sheridan Valley",
    "Cedar Ridge",
]
FACILITY_NOUNS = ["Hospital", "Medical Center", "Nursing Home", "Clinic", "Assisted Living", "Rehabilitation Center"]

TEMPLATES = {
    "NAME": [
        "Patient: {FULL} was admitted with chest pain; troponin negative.",
        "Dr. {LAST} reviewed the echo and started metoprolol 25 mg BID.",
        "Seen by Dr. {FULL} in clinic for follow-up of E11.9.",
        "My name is {FULL} and I have had a cough for 3 weeks.",
        "Mrs. {LAST} reports dizziness when standing; BP 100/60.",
        "patient {FULL} was seen today for HbA1c 8.1% and foot pain.",
        "Ms. {FULL} denies fever or chills.",
        "Mr. {LAST} is a 67-year-old man with COPD.",
        "{FULL}, MD, signed the discharge summary.",
        "My daughter {FIRST} has had a fever of 39 C since Tuesday.",
        "Name: {LASTFIRST}",
        "Referring physician: Dr. {FULL}",
        "Emergency contact: {FULL} (wife)",
        "Patient {FULL} presented with shortness of breath.",
        "I'm writing about my husband {FULL}, who takes warfarin.",
        "Hello, my name is {FIRST}. I take 20 mg of atorvastatin.",
        "Thanks, Dr. {LAST}! The 0.5 mL dose worked.",
        "Electronically signed by: {FULL}, RN",
        "Her oncologist, Dr. {LAST}, recommended 6 cycles.",
        "Attending: {FULL}",
        "The patient, {FULL}, was given 2 L of oxygen.",
        "Pt. {FULL} c/o back pain x 2 weeks.",
        "{FULL} was admitted overnight for IV fluids.",
        "Dr. van der {LAST} adjusted the warfarin to 5 mg.",
    ],
    "DATE": [
        "Admitted on {DATE} with pneumonia; CRP 85 mg/L.",
        "DOB: {DATE}",
        "Last colonoscopy {DATE}, normal.",
        "She was discharged {DATE} on 40 mg furosemide.",
        "Follow-up scheduled for {DATE} at 10:30.",
        "Symptoms began on {DATE}; took ibuprofen 400 mg.",
        "Date of surgery: {DATE}.",
        "Her last period was {DATE}, cycles every 28 days.",
        "Flu shot given {DATE} (lot in chart).",
        "Since {DATE} he has had 3-4 episodes a day.",
    ],
    "AGE": [
        "A {AGE}-year-old woman presents with a hip fracture.",
        "Patient is {AGE} years old, on 5 mg apixaban.",
        "age {AGE}, BP 150/85",
        "My grandmother, aged {AGE}, fell twice this month.",
        "{AGE} y/o male with CHF, EF 35%.",
        "He is {AGE} years of age and lives alone.",
        "Age: {AGE}",
        "my {AGE} year old father has a UTI",
        "{AGE} yo F with dementia",
        "She turned {AGE} last week and still walks 2 miles.",
    ],
    "PHONE": [
        "Call me at {PHONE} if results are abnormal.",
        "Patient phone: {PHONE}",
        "Cell {PHONE}; prefers texts.",
        "You can reach her daughter at {PHONE}.",
        "Tel: {PHONE}",
        "Contact number {PHONE} (home).",
        "Pharmacy called from {PHONE} about the 90-day supply.",
        "Mobile: {PHONE}, best after 5 pm.",
    ],
    "FAX": [
        "Fax: {FAX}",
        "Please fax the records to {FAX}.",
        "Tel 617-555-0134, fax {FAX}",
        "Send the referral by fax to {FAX} today.",
        "Clinic fax number {FAX}.",
        "F/U notes faxed to {FAX} on request.",
        "T: 212-555-0101 F: {FAX}",
    ],
    "EMAIL": [
        "Email me at {EMAIL} with the lab results.",
        "Contact: {EMAIL}",
        "Her email is {EMAIL}.",
        "Results were sent to {EMAIL} yesterday.",
        "Reach out via {EMAIL} for the 2-week follow-up.",
    ],
    "SSN": ["SSN: {SSN}", "Social Security number {SSN} on file.", "His SSN is {SSN}.", "SS# {SSN}"],
    "MRN": [
        "MRN {MRN}",
        "MRN: {MRN}, admitted for DKA (glucose 540 mg/dL).",
        "Medical record number {MRN}.",
        "MR# {MRN}",
        "Patient ID: {MRN}",
        "Chart #{MRN} reviewed.",
        "medical record no. {MRN}",
    ],
    "HEALTH_PLAN": [
        "member ID {PLAN}",
        "Member ID: {PLAN}",
        "Insurance ID {PLAN}, copay $25.",
        "Policy number: {PLAN}",
        "Medicare number {PLAN}",
        "Health plan number {PLAN}",
        "subscriber ID {PLAN}",
        "Group number {PLAN}",
        "Health Plan ID: {PLAN}",
    ],
    "ACCOUNT": [
        "acct # {ACCOUNT}",
        "Account number: {ACCOUNT}",
        "Billing account {ACCOUNT} is past due.",
        "Please reference account no. {ACCOUNT} when paying.",
        "Acct: {ACCOUNT}",
    ],
    "LICENSE": [
        "DL# {LICENSE}",
        "Driver's license number {LICENSE}",
        "License number: {LICENSE}",
        "DEA number {LICENSE}",
        "Medical license #{LICENSE}",
        "driver's license {LICENSE} (photo ID checked)",
        "NPI {LICENSE}",
    ],
    "VEHICLE": [
        "VIN {VIN}",
        "Vehicle identification number: {VIN}",
        "license plate {PLATE}",
        "He was hit by a car with plate number {PLATE}.",
        "Car VIN: {VIN}",
        "Licence plate: {PLATE}",
        "The ambulance noted the VIN {VIN} of the vehicle.",
    ],
    "DEVICE": [
        "Pacemaker serial number {DEVICE}",
        "Serial no. {DEVICE}",
        "S/N: {DEVICE}",
        "Device ID {DEVICE}",
        "Insulin pump serial #: {DEVICE}",
        "ICD serial {DEVICE}, interrogated today.",
        "MAC address {MAC} of the glucose monitor.",
        "CGM serial number {DEVICE}",
    ],
    "URL": [
        "See my surgery diary at {URL}.",
        "Portal: {URL}",
        "Her blog {URL} describes the 6 mg dose.",
        "Upload the images to {URL} please.",
        "Link: {URL}",
    ],
    "IP": [
        "Login from IP {IPV4} at 02:14.",
        "The monitor streams to {IPV4}.",
        "Access from {IPV6} was blocked.",
        "Device IP address: {IPV6}",
        "Gateway {IPV4}, pump firmware 2.1.4.",
    ],
    "ADDRESS": [
        "Lives at {STREET}, {CITYSTATE} {ZIP}.",
        "Address: {STREET}",
        "Home: {STREET}, {CITYSTATE}",
        "Send the meter to {STREET}.",
        "She moved to {STREET} last month.",
        "Mailing address: {POBOX}",
    ],
    "ZIP": ["ZIP code {ZIP}", "zip {ZIP}", "{CITYSTATE} {ZIP}", "Postal code: {ZIP}", "Lives in {CITYSTATE} {ZIP}."],
    "LOCATION": [
        "She lives in {TOWN} with her sister.",
        "Moved from {TOWN} last year; A1c 7.4%.",
        "Lives alone in {TOWN}; walks 1 mile a day.",
        "He drove in from {TOWN} for the 8:00 visit.",
        "They are staying with a cousin in {TOWN}.",
    ],
    "FACILITY": [
        "Transferred from {FACILITY} with a GI bleed.",
        "Discharged to {FACILITY} on 5 mg apixaban.",
        "She was seen at {FACILITY} last week.",
        "Records requested from {FACILITY}.",
        "Follow-up at {FACILITY} in 2 weeks.",
    ],
}


def _fill(template: str, values: _Values) -> Example:
    text, spans, position = "", [], 0
    for match in re.finditer(r"\{(\w+)\}", template):
        category, method = SLOTS[match.group(1)]
        text += template[position : match.start()]
        value = getattr(values, method)()
        spans.append((len(text), len(text) + len(value), category))
        text += value
        position = match.end()
    return Example(text + template[position:], spans)


def generate(per_category: int = 60, seed: int = 20240611) -> list[Example]:
    """`per_category` examples for each category, each with clinical filler before or after it."""
    rng = random.Random(seed)
    values = _Values(rng)
    examples = []
    for templates in TEMPLATES.values():
        for i in range(per_category):
            example = _fill(templates[i % len(templates)], values)
            filler = rng.choice(CLINICAL)
            if filler and rng.random() < 0.5:
                shift = len(filler) + 1
                example = Example(f"{filler} {example.text}", [(s + shift, e + shift, c) for s, e, c in example.spans])
            elif filler:
                example = Example(f"{example.text} {filler}", example.spans)
            examples.append(example)
    return examples
