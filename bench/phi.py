"""PHI redaction: recall per identifier type, over-redaction and throughput.

    python bench/phi.py                    # both gold splits, NER on and off, and the MedQuAD throughput
    python bench/phi.py --no-medquad       # the gold splits only (seconds)

Measures, on this machine with nothing else running:
- on data/phi_deid/dev (what the rules were tuned on) and data/phi_deid/test (written by other authors, never
  tuned on): recall per gold type, Safe Harbor recall pooled (facilities and years alone excluded, as Safe
  Harbor excludes them), PHI-free notes touched, placeholders per PHI-free note, clinical values kept;
  with the NER model (the default) and with the rules alone;
- the time `python -m medlora.safety redact` takes on the 14k MedQuAD conversations (the command as a user
  runs it: start-up, model load, every worker, writing), and how many placeholders it leaves in that text,
  which names no patients: each one is a likely over-redaction.
Results go to bench/results/phi.{json,md} (--name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("MEDLORA_ROOT", str(ROOT))

from medlora.safety.phi import DEFAULT_NER_MODEL, PhiRedactor  # noqa: E402
from medlora.safety.phi_eval import read_gold, score  # noqa: E402

MEDQUAD = ROOT.parent / "shared" / "data" / "medquad" / "train.jsonl"
# the test files no engineer saw while the rules were tuned (data/phi_deid/README.md says why the others were)
UNSEEN = ("nursing_notes", "social_history", "phi_free")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-medquad", action="store_true", help="skip the MedQuAD throughput run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="phi", help="results file stem: <out>/<name>.{json,md}")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict = {"gold": {}}
    splits = {"dev": ("dev", None), "test": ("test", None), "test-unseen": ("test", UNSEEN)}
    for label, model in (("ner", DEFAULT_NER_MODEL), ("rules", None)):
        redactor = PhiRedactor(ner_model=model)
        for name, (folder, stems) in splits.items():
            result = score(redactor, read_gold(ROOT / "data" / "phi_deid" / folder, stems))
            result.pop("misses")
            results["gold"][f"{name}/{label}"] = result
    if not args.no_medquad and MEDQUAD.is_file():
        results["medquad"] = _medquad()
    results["machine"] = {"cpus": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version()}
    results["command"] = "python bench/phi.py " + " ".join(sys.argv[1:])
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(_table(results))
    print(_table(results))
    return 0


def _medquad() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        start = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "medlora.safety",
                "redact",
                "--in",
                str(MEDQUAD),
                "--out",
                str(Path(tmp) / "out.jsonl"),
                "--report",
                str(report),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"redact failed: {done.stderr[-2000:]}")
        data = json.loads(report.read_text())
    conversations = data["conversations"]["in"]
    return {
        "conversations": conversations,
        "wall_s": wall,
        "conversations_per_s": conversations / wall,
        "placeholders": data["phi_total"],
        "placeholders_by_category": {k: v for k, v in data["phi"].items() if v},
        "conversations_touched": data["conversations"]["redacted"],
    }


def _table(r: dict) -> str:
    lines = [
        f"# PHI redaction\n\nMade by `{r['command']}` on {r['machine']['cpus']} CPU cores "
        f"({r['machine']['processor']}, Python {r['machine']['python']}).\n",
        "dev: data/phi_deid/dev, which the rules were tuned on. test: data/phi_deid/test, written by other "
        "authors; test-unseen: its three files that no engineer saw before this measurement (four others "
        "were seen once, see data/phi_deid/README.md). ner: the default (spaCy en_core_web_sm + rules); "
        "rules: `ner_model: null`.\n",
        "| split / layers | notes | identifiers | Safe Harbor recall | names | dates | PHI-free notes touched | "
        "placeholders per PHI-free note | clinical values kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, g in r["gold"].items():
        names, dates = g["recall"].get("NAME", {}), g["recall"].get("DATE", {})
        lines.append(
            f"| {key} | {g['notes']} | {g['identifiers']} | {g['safe_harbor_recall']:.3f} | "
            f"{names.get('recall', 0):.3f} | {dates.get('recall', 0):.3f} | "
            f"{g['phi_free_touched']:.3f} ({g['phi_free_notes']}) | "
            f"{g['placeholders_per_phi_free_note']:.2f} | {g['clinical_kept']:.3f} "
            f"({g['clinical_values']}) |"
        )
    lines += ["", "Recall per gold type (found / total):", ""]
    types = sorted({t for g in r["gold"].values() for t in g["recall"]})
    lines += ["| split / layers | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
    for key, g in r["gold"].items():
        cells = [f"{g['recall'][t]['found']}/{g['recall'][t]['total']}" if t in g["recall"] else "-" for t in types]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if "medquad" in r:
        m = r["medquad"]
        lines += [
            "",
            f"`python -m medlora.safety redact` on {m['conversations']:,} MedQuAD conversations (NER on, "
            f"one worker per core): {m['wall_s']:.0f} s wall ({m['conversations_per_s']:.0f} "
            f"conversations/s). MedQuAD names no patients: its {m['placeholders']:,} placeholders in "
            f"{m['conversations_touched']:,} conversations are mostly over-redaction "
            f"({', '.join(f'{k} {v}' for k, v in m['placeholders_by_category'].items())}).",
        ]
    lines += [
        "",
        "DATE_YEAR: a year alone, which Safe Harbor allows; it is not counted in the pooled recall, nor is "
        "FACILITY. An identifier counts as removed when redacted spans of any category cover all its "
        "letters and digits (a leading title such as 'Dr.' may stay).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
