"""Training throughput and memory: medlora against TRL's SFTTrainer, same machine, model, data and LoRA.

    python bench/train_throughput.py                      # the default settings, one process each
    python bench/train_throughput.py --settings medlora,trl-fastest --samples 16

Each setting trains one epoch over the same conversations (default: 64 MedQuAD conversations from
../shared/data/medquad, else the bundled sample data) with LoRA on every linear layer, the same
rank, alpha, dropout, learning rate, schedule, sequence length, micro-batch and seed, with loss on
the assistant tokens only. The results go to bench/results/train_throughput.{json,md}; every
figure is defined under the table. TRL is an optional extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("MEDLORA_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEDQUAD = ROOT.parent / "shared" / "data" / "medquad"
SAMPLE = ROOT / "data" / "sample_medical"

# setting -> (framework, options). medlora's options are train.py overrides.
SETTINGS = {
    "medlora": ("medlora", []),
    "medlora-seed43": ("medlora", ["seed=43"]),
    # the same packed batches with every speed option off: fp32, eager attention over a
    # block-diagonal mask, the model's own loss, peft's LoRA layers with torch's dropout, glibc's
    # malloc. Only speed and memory may differ from medlora
    "medlora-plain": (
        "medlora",
        [
            "training.chunked_loss=false",
            "training.fast_dropout=false",
            "precision=fp32",
            "training.shared_prefix=false",
            "model.attn_implementation=eager",
            "training.fused_lora=false",
            "training.allocator=system",
        ],
    ),
    # the fast path with every conversation computing its own copy of the system prompt
    "medlora-unshared": ("medlora", ["training.shared_prefix=false"]),
    # the system prompt computed once per packed row instead of once per optimizer step
    "medlora-rowprefix": ("medlora", ["training.shared_prefix_scope=row"]),
    # the fast path in fp32: tells the effect of bf16 apart from that of the other options
    "medlora-fp32": ("medlora", ["precision=fp32"]),
    # one conversation per micro-batch: more optimizer steps per epoch than packed rows
    "medlora-unpacked": ("medlora", ["training.packing=false"]),
    # glibc's malloc instead of training.allocator=auto: the allocator's share of speed and memory
    "medlora-glibc": ("medlora", ["training.allocator=system"]),
    # activations recomputed in the backward pass: less memory, slower
    "medlora-lowmem": ("medlora", ["training.gradient_checkpointing=true"]),
    "trl-default": ("trl", {"packing": False, "precision": "fp32"}),
    "trl-packing": ("trl", {"packing": True, "precision": "fp32"}),
    "trl-bf16": ("trl", {"packing": False, "precision": "bf16"}),
    # packing, in the precision medlora's precision=auto picks: bf16 where the hardware computes it
    # natively; elsewhere (a CPU without AVX512-BF16/AMX) bf16 is emulated, over ten times slower than fp32
    "trl-fastest": ("trl", {"packing": True, "precision": "auto"}),
    # the same, on the allocator medlora's training.allocator=auto picks: how much of the memory
    # gap is the allocator alone
    "trl-fastest-mimalloc": ("trl", {"packing": True, "precision": "auto", "allocator": "mimalloc"}),
}
# TRL's default and its fastest setting; `--settings all` adds TRL's packing alone and bf16 alone,
# medlora-glibc and trl-fastest-mimalloc
DEFAULT_SETTINGS = [
    "medlora",
    "medlora-seed43",
    "medlora-plain",
    "medlora-rowprefix",
    "medlora-unshared",
    "medlora-fp32",
    "medlora-unpacked",
    "medlora-lowmem",
    "trl-default",
    "trl-fastest",
]
DEFINITIONS = """\
- **real tok/s**: tokens of the conversations (system prompt, question, reply, template tokens;
  never padding) processed by the training loop, divided by the loop's wall time (model loading,
  tokenization and evaluation excluded; data loading and optimizer steps included).
- **supervised tok/s**: the same for tokens that carry a label (the assistant replies).
- **peak RSS**: the largest resident memory of the setting's process, from the kernel (`wait4`),
  everything included (imports, model, data, evaluation). On a GPU, **peak GPU** is
  `torch.cuda.max_memory_allocated`.
- **MFU**: model FLOPs per second over the peak matmul rate measured
  with a {n}^3 matmul in the setting's dtype, in this run after the settings ({peaks}).
  Model FLOPs per token: 4 x N (N = {params:,} parameters: the base model with tied embeddings
  counted once, plus the adapter; forward 2N, backward to the activations 2N; frozen weights
  get no weight gradient) plus causal attention, 6 x layers x attention width x (L+1) per
  conversation of L tokens (QK and AV, forward and backward): {attn:,.0f} FLOPs per token on
  this data. The same count for every setting, whatever work it skips or wastes; medlora runs the
  LM head only at supervised positions, so its MFU counts some work it does not do
  ({head_share:.1%} of the 4 x N term). Tokens of a prefix shared by the conversations of an
  optimizer step or a packed row (training.shared_prefix: the system prompt, computed once per
  step or row) are counted in real tok/s once per conversation, but only once in MFU, as computed.
- **eval loss**: mean cross-entropy per supervised token on {eval_n} held-out conversations, after
  the epoch, computed by the same code for every setting (medlora.loss.mean_loss); before
  training it is {before:.4f}.
"""


def main() -> None:
    args = _parse()
    if args.worker:
        return _worker(args)
    out = Path(args.out)
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if not Path(path).is_file():
            sys.exit(f"error: {flag} {path} is not a file: give a JSONL file of conversations.")
    if args.merge and not (out / "train_throughput.json").is_file():
        sys.exit(f"error: --merge needs an earlier {out / 'train_throughput.json'}: run without --merge first.")
    settings = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        sys.exit(f"unknown setting(s) {', '.join(unknown)}: choose from {', '.join(SETTINGS)}")
    if any(SETTINGS[s][0] == "trl" for s in settings):
        try:
            import trl  # noqa: F401
        except ImportError:
            sys.exit("TRL is not installed: pip install -e '.[bench]' (or leave out the trl-* settings).")
    model_file = ROOT / "conf" / "model" / f"{args.model}.yaml"
    if not model_file.is_file():
        names = sorted(p.stem for p in model_file.parent.glob("*.yaml"))
        sys.exit(f"error: --model {args.model} is not a config in conf/model/: use one of {', '.join(names)}.")
    work = Path(tempfile.mkdtemp(prefix="medlora-bench-"))
    try:
        data = _prepare_data(args, work, model_file)
    except BaseException:  # a bad data file: its message, and no work folder left behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    earlier = json.loads((out / "train_throughput.json").read_text()) if args.merge else None
    # one table from several invocations: same machine, so the earlier peaks stand
    peaks = earlier["matmul_peak_gflops"] if earlier else {}
    results = [r for r in earlier["results"] if r["setting"] not in settings] if earlier else []
    for name in settings:
        print(f"--- {name}", flush=True)
        result = _run_setting(name, args, data, work)
        results.append(result)
        print(json.dumps(result), flush=True)
    # measured after the settings, alone on the machine, for the dtypes that ran
    for dtype in sorted({r["precision"] for r in results} - peaks.keys()):
        peaks[dtype] = _matmul_peak(dtype, args.matmul_size)
        print(f"matmul peak {dtype}: {peaks[dtype]:.0f} GFLOP/s", flush=True)
    order = list(SETTINGS)
    results.sort(key=lambda r: order.index(r["setting"]))
    report = _report(results, data, peaks, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(
        json.dumps(
            {
                "machine": _machine(),
                "args": vars(args),
                "matmul_peak_gflops": peaks,
                "data": data["stats"],
                "results": results,
            },
            indent=2,
        )
    )
    (out / "train_throughput.md").write_text(report)
    print(report)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_data = MEDQUAD / "train.jsonl" if (MEDQUAD / "train.jsonl").is_file() else SAMPLE / "train.jsonl"
    default_eval = MEDQUAD / "eval.jsonl" if (MEDQUAD / "eval.jsonl").is_file() else SAMPLE / "eval.jsonl"
    p.add_argument(
        "--settings",
        default=",".join(DEFAULT_SETTINGS),
        help="comma-separated, from: " + ", ".join(SETTINGS) + "; or all",
    )
    p.add_argument("--model", default="smollm2_135m", help="a config name from conf/model/")
    p.add_argument("--data", default=str(default_data), help="JSONL conversations to train on")
    p.add_argument("--eval-data", default=str(default_eval))
    p.add_argument("--samples", type=int, default=64, help="training conversations (one epoch)")
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="rows of max-seq-len tokens per optimizer step")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument(
        "--merge",
        action="store_true",
        help="add these settings to the results already in --out (same arguments) instead of starting over",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args()


def _prepare_data(args, work: Path, model_file: Path) -> dict:
    """The conversations, cleaned by medlora's safety step once, so every setting trains on the same text."""

    from medlora.config import option
    from medlora.data import load_conversations, tokenize_dataset, with_system_prompt
    from medlora.model import load_tokenizer, resolve_checkpoint
    from medlora.safety.clean import clean_conversations

    safety = option("safety", "medical")
    files = {}
    for name, path, n in (("train", args.data, args.samples), ("eval", args.eval_data, args.eval_samples)):
        conversations, _ = clean_conversations(load_conversations(path, n), safety)
        rows = [{"messages": with_system_prompt(c, safety.system_prompt)} for c in conversations]
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_cfg = _model_config(model_file.stem)
    model_path, tokenizer_path = resolve_checkpoint(model_cfg, str(ROOT / ".cache"), args.seed)
    tokenizer = load_tokenizer(tokenizer_path)
    examples, stats = tokenize_dataset(
        load_conversations(files["train"]), tokenizer, None, args.max_seq_len, "truncate"
    )
    lengths = [len(e.input_ids) for e in examples]
    return {
        "train": str(files["train"]),
        "eval": str(files["eval"]),
        "model_path": model_path,
        "tokenizer_path": tokenizer_path,
        "lengths": lengths,
        "stats": {
            "conversations": stats.conversations,
            "tokens": stats.tokens,
            "supervised_tokens": stats.supervised_tokens,
            "truncated": stats.truncated,
        },
    }


def _model_config(name: str):
    """conf/model/<name>.yaml as train.py composes it (with the quantization blocks it includes)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"model={name}"]).model


def _matmul_peak(dtype: str, n: int) -> float:
    """Best GFLOP/s of an n^3 matmul in `dtype`, measured in a fresh process like the settings run in.

    Rounds of one matmul for about 3 seconds after a warm-up, at least 3: a dtype the hardware
    only emulates (bf16 on an AVX2 CPU: about 1 GFLOP/s) still finishes in a minute.
    """
    from medlora.model import DTYPES  # repr: torch.float32, ...

    code = (
        "import torch,time\n"
        f"d={DTYPES[dtype]};a=torch.randn({n},{n},dtype=d);b=torch.randn({n},{n},dtype=d)\n"
        "dev='cuda' if torch.cuda.is_available() else 'cpu';a,b=a.to(dev),b.to(dev)\n"
        "sync=torch.cuda.synchronize if dev=='cuda' else (lambda:None)\n"
        "a@b;sync();best,rounds,spent=0,0,0.0\n"
        "while rounds<3 or spent<3:\n"
        "  t=time.perf_counter();a@b;sync();s=time.perf_counter()-t\n"
        f"  best,rounds,spent=max(best,2*{n}**3/s/1e9),rounds+1,spent+s\n"
        "print(best)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _run_setting(name: str, args, data: dict, work: Path) -> dict:
    framework, options = SETTINGS[name]
    folder = work / name
    folder.mkdir()
    if framework == "medlora":
        cmd = [sys.executable, str(ROOT / "train.py"), *_medlora_overrides(args, data, folder), *options]
    else:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            json.dumps(options),
            "--work",
            str(folder),
            *_passthrough(args),
            "--data",
            data["train"],
            "--eval-data",
            data["eval"],
        ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if framework == "trl" and options.get("allocator"):
        from medlora.allocator import preload_env

        env = preload_env(options["allocator"], env)
    log_path = folder / "output.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        # note: wait4 reaps the child and reports its own peak RSS, not this process's
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log_path.read_text()[-3000:]
        sys.exit(f"setting {name} failed (log: {log_path}):\n{tail}")
    result = _medlora_result(folder) if framework == "medlora" else json.loads((folder / "result.json").read_text())
    return {"setting": name, "framework": framework, **result, "peak_rss_gb": usage.ru_maxrss / 1e6}


def _passthrough(args) -> list[str]:
    keep = (
        "model",
        "samples",
        "eval_samples",
        "max_seq_len",
        "batch_size",
        "rank",
        "alpha",
        "dropout",
        "learning_rate",
        "seed",
    )
    return [item for k in keep for item in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def _medlora_overrides(args, data: dict, folder: Path) -> list[str]:
    return [
        f"model={args.model}",
        "data=jsonl",
        f"data.train_file={data['train']}",
        f"data.eval_file={data['eval']}",
        f"lora.rank={args.rank}",
        f"lora.alpha={args.alpha}",
        f"lora.dropout={args.dropout}",
        f"training.learning_rate={args.learning_rate}",
        "training.lr_scheduler=linear",
        "training.warmup_ratio=0",
        # the same tokens per optimizer step as TRL's batch of batch_size rows, in micro-batches of one
        # row each (medlora's default: faster and leaner on a CPU; the gradient is the same)
        "training.batch_size=1",
        f"training.gradient_accumulation_steps={args.batch_size}",
        f"training.max_seq_len={args.max_seq_len}",
        "training.max_steps=0",
        "training.num_epochs=1",
        f"seed={args.seed}",
        f"hydra.run.dir={folder}/run",
        f"tracking.uri=sqlite:///{folder}/mlflow.db",
        f"tracking.artifact_location={folder}/artifacts",
        "tracking.log_adapter=false",
    ]


def _medlora_result(folder: Path) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    m = run.data.metrics
    losses = [x.value for x in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda x: x.step)]
    return {
        "real_tokens_per_second": m["train_tokens_per_second"],
        "supervised_tokens_per_second": m["train_supervised_tokens_per_second"],
        "eval_loss_before": m["eval_loss_before"],
        "eval_loss": m["eval_loss"],
        "train_losses": losses,
        "steps": len(losses),
        "precision": run.data.params["resolved_precision"],
        "trainable_params": int(run.data.params["trainable_params"]),
        "total_params": int(run.data.params["total_params"]),
        "peak_gpu_gb": m.get("peak_gpu_memory_gb"),
        "shared_prefix_fraction": m.get("train_shared_prefix_fraction", 0.0),
    }


def _worker(args) -> None:
    """One TRL SFTTrainer run, as its documentation sets it up, with tokens counted as they are fed."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from medlora.batching import make_loader
    from medlora.config import resolve_device, resolve_precision
    from medlora.data import IGNORE, load_conversations, tokenize_dataset
    from medlora.loss import mean_loss as evaluate
    from medlora.model import load_tokenizer, quantization_config, resolve_checkpoint

    options, folder = json.loads(args.worker), Path(args.work)
    precision = resolve_precision(options["precision"], resolve_device("auto"))
    model_cfg = _model_config(args.model)
    model_path, tokenizer_path = resolve_checkpoint(model_cfg, str(ROOT / ".cache"), args.seed)
    tokenizer = load_tokenizer(tokenizer_path)
    # prompt-completion conversations: TRL's completion-only loss (its default for this format)
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in load_conversations(args.data)]
    config = SFTConfig(
        output_dir=str(folder / "out"),
        max_length=args.max_seq_len,
        packing=options["packing"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        model_init_kwargs={"attn_implementation": model_cfg.attn_implementation},
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    quant = quantization_config(model_cfg, torch.bfloat16)
    trainer = SFTTrainer(
        model=model_path,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        quantization_config=quant,
    )

    counts = {"tokens": 0, "supervised": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counts["tokens"] += (
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        )
        counts["supervised"] += int((batch["labels"][..., 1:] != IGNORE).sum())
        return batch

    trainer.data_collator = counting
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            clock["seconds"] = time.perf_counter() - clock["start"]

    trainer.add_callback(Clock())
    eval_examples, _ = tokenize_dataset(
        load_conversations(args.eval_data), tokenizer, None, args.max_seq_len, "truncate"
    )
    eval_loader = make_loader(eval_examples, args.batch_size, tokenizer.pad_token_id, args.seed, train=False)
    before = evaluate(trainer.model, eval_loader, trainer.accelerator)["eval_loss"]
    trainer.train()
    after = evaluate(trainer.model, eval_loader, trainer.accelerator)["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainable, total = trainer.model.get_nb_trainable_parameters()
    result = {
        "real_tokens_per_second": counts["tokens"] / clock["seconds"],
        "supervised_tokens_per_second": counts["supervised"] / clock["seconds"],
        "eval_loss_before": before,
        "eval_loss": after,
        "train_losses": losses,
        "steps": len(losses),
        "precision": precision,
        "trainable_params": trainable,
        "total_params": total,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
    }
    (folder / "result.json").write_text(json.dumps(result))


def _model_flops(data: dict) -> tuple[float, int]:
    """(attention FLOPs per token, LM head parameters) for the definitions above."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(data["model_path"])
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    width = text.num_attention_heads * head_dim
    lengths = data["lengths"]
    attention = 6 * text.num_hidden_layers * width * sum(n * (n + 1) for n in lengths) / sum(lengths)
    return attention, text.vocab_size * text.hidden_size


def _report(results: list[dict], data: dict, peaks: dict, args) -> str:
    attention, head = _model_flops(data)
    n = results[0]["total_params"]
    rows = [
        "| setting | precision | real tok/s | supervised tok/s | peak RSS | MFU | steps | eval loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        computed = r["real_tokens_per_second"] * (1 - r.get("shared_prefix_fraction", 0.0))
        mfu = (4 * n + attention) * computed / (peaks[r["precision"]] * 1e9)
        r["mfu"] = mfu
        gpu = f" ({r['peak_gpu_gb']:.1f} GB GPU)" if r.get("peak_gpu_gb") else ""
        rows.append(
            f"| {r['setting']} | {r['precision']} | {r['real_tokens_per_second']:.0f} | "
            f"{r['supervised_tokens_per_second']:.0f} | {r['peak_rss_gb']:.2f} GB{gpu} | {mfu:.1%} | "
            f"{r['steps']} | {r['eval_loss']:.4f} |"
        )
    ratios = _ratios(results)
    stats = data["stats"]
    header = (
        f"# Training throughput: {args.model}, LoRA r={args.rank} alpha={args.alpha:g} dropout={args.dropout:g} "
        f"all-linear, max length {args.max_seq_len}, batch {args.batch_size}\n\n"
        f"{stats['conversations']} conversations ({stats['tokens']:,} tokens, {stats['supervised_tokens']:,} "
        f"supervised, {stats['truncated']} truncated), one epoch; {_machine()}\n\n"
    )
    measured = ", ".join(f"{dtype}: {gflops:.0f} GFLOP/s" for dtype, gflops in sorted(peaks.items()))
    definitions = DEFINITIONS.format(
        n=args.matmul_size,
        peaks=measured,
        params=n,
        attn=attention,
        head_share=head / n,
        eval_n=args.eval_samples,
        before=results[0]["eval_loss_before"],
    )
    return header + "\n".join(rows) + "\n\n" + ratios + "\n\nDefinitions:\n" + definitions


def _ratios(results: list[dict]) -> str:
    by = {r["setting"]: r for r in results}
    # TRL as its users run it; the settings on medlora's allocator are compared apart
    trl = [r for r in results if r["framework"] == "trl" and not SETTINGS[r["setting"]][1].get("allocator")]
    trl_preloaded = [r for r in results if r["framework"] == "trl" and SETTINGS[r["setting"]][1].get("allocator")]
    lines = []
    if "medlora" in by and trl:
        m, fastest, leanest = by["medlora"], _fastest(trl), _leanest(trl)
        lines.append(
            f"- medlora vs TRL's fastest setting ({fastest['setting']}): {_speed_ratio(m, fastest):.2f}x the "
            f"supervised tokens/s; peak RSS {m['peak_rss_gb'] / leanest['peak_rss_gb']:.2f} of TRL's lowest "
            f"({leanest['setting']}, {leanest['peak_rss_gb']:.2f} GB)"
        )
        if "medlora-lowmem" in by:
            low = by["medlora-lowmem"]
            lines.append(
                f"- medlora-lowmem vs the same: {_speed_ratio(low, fastest):.2f}x the supervised tokens/s; "
                f"peak RSS {low['peak_rss_gb'] / leanest['peak_rss_gb']:.2f} of TRL's lowest"
            )
    if "medlora" in by and trl_preloaded:
        m, fastest, leanest = by["medlora"], _fastest(trl_preloaded), _leanest(trl_preloaded)
        lines.append(
            f"- medlora vs TRL on medlora's allocator ({fastest['setting']}): {_speed_ratio(m, fastest):.2f}x the "
            f"supervised tokens/s; peak RSS {m['peak_rss_gb'] / leanest['peak_rss_gb']:.2f} of its "
            f"{leanest['peak_rss_gb']:.2f} GB"
        )
    if by.get("medlora", {}).get("shared_prefix_fraction"):
        others = [
            f"{_speed_ratio(by['medlora'], by[name]):.2f}x the supervised tokens/s of {name} "
            f"({by[name]['shared_prefix_fraction']:.1%} spared, eval loss {by[name]['eval_loss']:.4f})"
            for name in ("medlora-rowprefix", "medlora-unshared")
            if name in by
        ]
        lines.append(
            f"- medlora computed the prefix its conversations share (the system prompt) once per optimizer "
            f"step: {by['medlora']['shared_prefix_fraction']:.1%} of the real tokens spared"
            + "".join(f"; {other}" for other in others)
        )
    if {"medlora", "medlora-plain"} <= by.keys():
        noise = (
            f"; seed 42 vs 43 of the fast path: {abs(by['medlora']['eval_loss'] - by['medlora-seed43']['eval_loss']):.4f}"
            if "medlora-seed43" in by
            else ""
        )
        lines.append(
            f"- eval loss, fast path vs plain path (same batches and seed): {by['medlora']['eval_loss']:.4f} vs "
            f"{by['medlora-plain']['eval_loss']:.4f}, difference "
            f"{abs(by['medlora']['eval_loss'] - by['medlora-plain']['eval_loss']):.4f}{noise}"
        )
        if "medlora-fp32" in by:
            lines.append(
                f"- eval loss of the fast path in fp32: {by['medlora-fp32']['eval_loss']:.4f}, "
                f"{abs(by['medlora-fp32']['eval_loss'] - by['medlora-plain']['eval_loss']):.4f} from the plain path"
            )
        lines.append(
            f"- speed-up of the fast path over the plain path: "
            f"{by['medlora']['real_tokens_per_second'] / by['medlora-plain']['real_tokens_per_second']:.2f}x"
        )
    return "\n".join(lines)


def _fastest(results: list[dict]) -> dict:
    return max(results, key=lambda r: r["supervised_tokens_per_second"])


def _leanest(results: list[dict]) -> dict:
    return min(results, key=lambda r: r["peak_rss_gb"])


def _speed_ratio(a: dict, b: dict) -> float:
    return a["supervised_tokens_per_second"] / b["supervised_tokens_per_second"]


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"


if __name__ == "__main__":
    from medlora.config import MedloraError

    try:
        main()
    except MedloraError as err:  # bad data file, model name, ...: one message, no traceback
        sys.exit(f"error: {err}")
