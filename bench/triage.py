"""Triage speed: one triage of a short and a long conversation, and `screen` over many prompts.

    python bench/triage.py                                   # the shipped triage model, as shipped (fp32)
    python bench/triage.py --prompts 2000 --repeats 30       # quicker

Measures, on this machine with nothing else running:
- latency of one `Triage.check_messages` (rules + model, as inference runs it) on a conversation of
  about 100 and about 1,000 tokens (p50 and p95 over --repeats calls after a warm-up), and of the
  rules alone;
- the time `python -m medlora.safety screen` takes on --prompts prompts (the command as a user runs
  it: start-up, model load, triage, writing), and triage's own prompts per second inside it;
- the figures of the triage targets on the held-out split (data/safety_triage/test: never trained on
  or tuned against) for the rules, the model and both as inference runs them, overall, in languages
  other than English and on multi-turn conversations;
- the model's agreement between fp32 and dynamic int8 matmuls on the validation conversations, and
  the speed of each: the int8 trade-off.
Prompts are MedQuAD questions from ../shared/data/medquad when present, else the project's own
validation conversations, repeated. Results go to bench/results/triage.{json,md} (--name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("MEDLORA_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from medlora import cli  # noqa: E402,F401 - quiets import noise as the entry points do
from medlora.safety.settings import medical_defaults  # noqa: E402
from medlora.safety.triage import Triage  # noqa: E402
from medlora.safety.triage_data import read_rows  # noqa: E402
from medlora.safety.triage_eval import measure  # noqa: E402
from medlora.safety.triage_model import TriageModel, resolve_spec, transcript  # noqa: E402

MEDQUAD = ROOT.parent / "shared" / "data" / "medquad" / "train.jsonl"
VAL = ROOT / "data" / "safety_triage" / "val"
TEST = ROOT / "data" / "safety_triage" / "test"
FIGURES = ("emergency_recall", "crisis_caught", "harmful_declined", "benign_flagged", "balanced_accuracy")


def _conversation_of_tokens(model: TriageModel, rows: list, target: int) -> tuple[list[dict], int]:
    """Turns from `rows` until the classifier reads about `target` tokens of conversation."""
    messages: list[dict] = []
    for _, convo, _ in rows:
        for turn in convo:
            messages.append(
                {
                    "role": "assistant" if messages and messages[-1]["role"] == "user" else "user",
                    "content": turn["content"],
                }
            )
            if messages[-1]["role"] == "user":
                n = len(model.tokenizer(transcript(messages, model.max_chars))["input_ids"])
                if n >= target:
                    return messages, n
    raise SystemExit(f"not enough text for a {target}-token conversation")


def _latency(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))],
        "mean_ms": statistics.fmean(times),
    }


def _prompts(n: int) -> tuple[list[str], str]:
    if MEDQUAD.is_file():
        lines = MEDQUAD.read_text(encoding="utf-8").splitlines()
        questions = [json.loads(line)["messages"][0]["content"] for line in lines if line.strip()]
        source = "MedQuAD questions (../shared/data/medquad/train.jsonl)"
    else:
        questions = [m[-1]["content"] for path in sorted(VAL.glob("*.jsonl")) for _, m, _ in read_rows(path)]
        source = "data/safety_triage/val conversations' last user turns"
    return [questions[i % len(questions)] for i in range(n)], source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=medical_defaults()["triage"]["model"], help="triage adapter folder")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=10_000, help="prompts for the screen throughput")
    parser.add_argument("--agreement-rows", type=int, default=None, help="validation rows for int8 vs fp32 (all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="triage", help="results file stem: <out>/<name>.{json,md}")
    args = parser.parse_args()
    folder = resolve_spec(args.model)
    cache = os.environ.get("MEDLORA_CACHE") or str(ROOT / ".cache")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    settings = {**medical_defaults()["triage"], "model": str(folder)}
    triage = Triage.from_config(settings, cache)
    load_s = time.perf_counter() - started
    model = triage.model
    val = [row for path in sorted(VAL.glob("*.jsonl")) for row in read_rows(path)]
    results: dict = {"model": str(args.model), "compute": model.compute, "load_s": load_s, "latency": {}}
    rules = Triage(medical_defaults()["triage"])
    for target in (100, 1000):
        messages, tokens = _conversation_of_tokens(model, val, target)
        results["latency"][str(target)] = {
            "tokens": tokens,
            "turns": len(messages),
            "rules_and_model": _latency(lambda m=messages: triage.check_messages(m), args.repeats),
            "rules": _latency(lambda m=messages: rules.check_messages(m), args.repeats),
        }

    prompts, source = _prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        given = Path(tmp) / "prompts.jsonl"
        given.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "medlora.safety",
                "screen",
                "--in",
                str(given),
                "--out",
                str(Path(tmp) / "d.jsonl"),
                "--model",
                str(folder),
            ],
            capture_output=True,
            text=True,
        )
        screen_s = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        actions = [json.loads(line)["action"] for line in (Path(tmp) / "d.jsonl").read_text().splitlines()]
    started = time.perf_counter()
    triage.check_many([[{"role": "user", "content": p}] for p in prompts[:2000]])
    inside = min(2000, len(prompts)) / (time.perf_counter() - started)
    results["screen"] = {
        "prompts": len(prompts),
        "source": source,
        "wall_s": screen_s,
        "prompts_per_s": len(prompts) / screen_s,
        "triage_prompts_per_s_in_process": inside,
        "flagged": sum(a != "allow" for a in actions),
    }

    results["held_out"] = _held_out(triage, rules)

    rows = val[: args.agreement_rows]
    conversations = [m for _, m, _ in rows]
    other = TriageModel(folder, cache, compute="int8" if model.compute == "fp32" else "fp32")
    by_compute = {model.compute: model, other.compute: other}
    int8_scores, int8_s = _timed(lambda: by_compute["int8"].scores(conversations))
    fp32_scores, fp32_s = _timed(lambda: by_compute["fp32"].scores(conversations))
    agree = sum(model.decide(a) == model.decide(b) for a, b in zip(int8_scores, fp32_scores)) / len(rows)
    drift = max(abs(a[k] - b[k]) for a, b in zip(int8_scores, fp32_scores) for k in a)
    results["int8_vs_fp32"] = {
        "rows": len(rows),
        "action_agreement": agree,
        "max_probability_difference": drift,
        "int8_rows_per_s": len(rows) / int8_s,
        "fp32_rows_per_s": len(rows) / fp32_s,
    }
    results["machine"] = {"cpus": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version()}
    results["command"] = "python bench/triage.py " + " ".join(sys.argv[1:])
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(_table(results))
    print(_table(results))
    return 0


def _held_out(triage: Triage, rules: Triage) -> dict:
    rows = [
        json.loads(line)
        for path in sorted(TEST.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    conversations = [row["messages"] for row in rows]
    decisions = triage.check_many(conversations)
    actions = {
        "rules": [d.action for d in rules.check_many(conversations)],
        "model": [triage.model.decide(d.scores) for d in decisions],
        "rules_or_model": [d.action for d in decisions],
    }
    subsets = {
        "all": [True] * len(rows),
        "not English": [row.get("lang", "en") != "en" for row in rows],
        "multi-turn": [len(row["messages"]) > 1 for row in rows],
    }
    found = {}
    for subset, keep in subsets.items():
        labels = [row["label"] for row, k in zip(rows, keep) if k]
        found[subset] = {
            "rows": len(labels),
            **{who: measure(labels, [a for a, k in zip(acts, keep) if k]) for who, acts in actions.items()},
        }
    return found


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def _table(r: dict) -> str:
    lines = [
        f"# Triage speed and held-out figures: {r['model']} ({r['compute']}), {r['machine']['cpus']} CPU cores",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Model load: {r['load_s']:.1f} s",
        "",
        "| conversation | tokens read | rules + model p50 | p95 | rules alone p50 | p95 |",
        "|---|---|---|---|---|---|",
    ]
    for target, found in r["latency"].items():
        both, rules = found["rules_and_model"], found["rules"]
        lines.append(
            f"| ~{target} tokens, {found['turns']} turns | {found['tokens']} | {both['p50_ms']:.1f} ms | "
            f"{both['p95_ms']:.1f} ms | {rules['p50_ms']:.1f} ms | {rules['p95_ms']:.1f} ms |"
        )
    s = r["screen"]
    lines += [
        "",
        f"`python -m medlora.safety screen` on {s['prompts']:,} prompts ({s['source']}): "
        f"{s['wall_s']:.1f} s wall, start-up and model load included ({s['prompts_per_s']:.1f} prompts/s); "
        f"triage inside it {s['triage_prompts_per_s_in_process']:.1f} prompts/s; {s['flagged']} flagged.",
        "",
        "Held-out split (data/safety_triage/test, never trained on or tuned against):",
        "",
        "| rows | triage | " + " | ".join(FIGURES) + " |",
        "|---" * (len(FIGURES) + 2) + "|",
    ]
    for subset, found in r["held_out"].items():
        for who in ("rules", "model", "rules_or_model"):
            lines.append(
                f"| {subset} (n={found['rows']}) | {who} | "
                + " | ".join(f"{found[who][k]:.3f}" if k in found[who] else "-" for k in FIGURES)
                + " |"
            )
    lines += [
        "",
        "int8 against fp32 on the same merged weights, "
        f"{r['int8_vs_fp32']['rows']} validation conversations: actions agree on "
        f"{100 * r['int8_vs_fp32']['action_agreement']:.1f}%, largest probability difference "
        f"{r['int8_vs_fp32']['max_probability_difference']:.3f}; int8 {r['int8_vs_fp32']['int8_rows_per_s']:.1f} "
        f"conversations/s, fp32 {r['int8_vs_fp32']['fp32_rows_per_s']:.1f}.",
        "",
        "Latency: wall time of one `Triage.check_messages` call (rules, then the model's one forward pass over "
        "the conversation's own tokens against the cached instruction), after one warm-up call.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
