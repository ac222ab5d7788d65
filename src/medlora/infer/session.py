"""One `infer.py` session: check the request, then export and/or answer a prompt, a prompt file or a chat.

Every check that can refuse the request runs before any model loads, and nothing is written
before they pass.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from medlora import data as medata
from medlora.audit import AuditTrail
from medlora.config import require, resolve_device, resolve_precision, validate_model, validate_safety
from medlora.config.groups import Inference, Tracking
from medlora.config.schema import build
from medlora.files import sha256_file, sha256_text, write_jsonl
from medlora.infer import export as exporter
from medlora.infer.assistant import Assistant, Reply
from medlora.infer.sources import Source, check_base_model, find_source, load_adapter_model, use_training_config
from medlora.model import resolve_checkpoint
from medlora.tracking import git_commit

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# config checks


def validate(cfg: DictConfig) -> None:
    """Check what inference reads, before anything loads."""
    validate_model(cfg.model)
    validate_safety(cfg.safety)
    build(Inference, cfg.inference)
    build(Tracking, cfg.tracking)


def check_request(cfg: DictConfig, info) -> tuple[Source, str | None, list | None]:
    """Everything that can reject the request, before any model loads: (source, prompt, prompt file rows)."""
    modes = [name for name in ("prompt", "input", "chat") if cfg[name] not in (None, False)]
    require(len(modes) <= 1, f"give one of prompt=..., input=... or chat=true, not {' and '.join(modes)}.")
    require(
        bool(modes) or bool(cfg.export.merged_dir or cfg.export.log_model),
        'nothing to do: give prompt="...", input=prompts.jsonl, chat=true, or export.merged_dir=<folder> / '
        "export.log_model=true.",
    )
    prompt = None if cfg.prompt is None else str(cfg.prompt)  # Hydra reads prompt=42 as a number
    require(
        prompt is None or bool(prompt.strip()),
        'prompt is empty: give the question, e.g. prompt="What is a normal resting heart rate?".',
    )
    source = find_source(cfg)
    if source.trained is not None:
        brought = use_training_config(cfg, source.trained, list(info.overrides))
        log.info(
            "from the adapter's training run: %s (model.base_model=%s)",
            ", ".join(brought) or "nothing",
            cfg.model.base_model,
        )
    validate(cfg)
    if cfg.safety.triage.enabled:
        from medlora.safety import triage_model

        triage_model.check(cfg.safety.triage.get("model"))
    exporter.check_target(cfg)
    rows = read_prompts(str(cfg.input)) if cfg.input else None
    check_base_model(source.adapter_dir, resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)[0], cfg.model)
    return source, prompt, rows


# --------------------------------------------------------------------------------------------
# the session: audit trail, modes


def open_audit(cfg: DictConfig, output_dir: Path, source: Source, adapter_sha256: str) -> AuditTrail | None:
    if not cfg.safety.audit.enabled:
        return None
    # the hash names what answers: model, adapter weights, safety and generation settings
    setup = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "safety", "inference")}
    setup["adapter_model"] = adapter_sha256
    return AuditTrail(
        output_dir / "audit.jsonl",
        actor=f"{getpass.getuser()}@{socket.gethostname()}",
        run_id=f"infer:{output_dir.name}" + (f":from:{source.run_id}" if source.run_id else ""),
        config_hash=sha256_text(json.dumps(setup, sort_keys=True)),
        git_commit=git_commit(cfg.paths.root_dir),
    )


def read_prompts(path: str) -> list[tuple[dict, list[dict]]]:
    """(row to echo, conversation) per line: {"prompt": ...} or {"messages": [...]}, plus an optional "id"."""
    require(
        Path(path).is_file(),
        f'input={path} does not exist: give a JSONL file of prompts, one {{"prompt": "..."}} per line.',
    )
    rows = []
    for number, row in medata.read_jsonl(path):
        where = f"{path}:{number}"
        if "messages" in row:
            messages = row["messages"]
            ok = (
                isinstance(messages, list)
                and messages
                and all(
                    isinstance(m, dict) and m.get("role") in medata.ROLES and isinstance(m.get("content"), str)
                    for m in messages
                )
            )
            require(bool(ok), f"{where}: `messages` must be a list of {{role, content}} objects.")
            require(messages[-1]["role"] == "user", f"{where}: the last message must be the user's, to be answered.")
        else:
            prompt = row.get("prompt")
            require(
                isinstance(prompt, str),
                f'{where}: expected {{"prompt": "..."}} or {{"messages": [...]}}, got keys {sorted(row)}.',
            )
            messages = [{"role": "user", "content": prompt}]
        require(bool(messages[-1]["content"].strip()), f"{where}: the prompt is empty.")
        echo = {"line": number, **({"id": row["id"]} if "id" in row else {}), "prompt": messages[-1]["content"]}
        rows.append((echo, [{"role": m["role"], "content": m["content"]} for m in messages]))
    require(bool(rows), f'input={path} holds no prompts: the file is empty. Give one {{"prompt": "..."}} per line.')
    return rows


def answer_prompt(assistant: Assistant, prompt: str, out=None) -> Reply:
    out = out or sys.stdout
    reply = assistant.reply([{"role": "user", "content": prompt}], on_text=_writer(out))
    out.write("\n")
    _log_reply(reply)
    return reply


def answer_file(assistant: Assistant, rows: list[tuple[dict, list[dict]]], output: Path) -> dict[str, float]:
    start = time.perf_counter()
    replies = assistant.reply_batch([messages for _, messages in rows])
    seconds = time.perf_counter() - start
    write_jsonl(output, [{**echo, **reply.as_row()} for (echo, _), reply in zip(rows, replies)])
    generated = [r for r in replies if r.model_called]
    tokens = sum(r.new_tokens for r in generated)
    stats = {
        "prompts": len(replies),
        "answered_by_triage": len(replies) - len(generated),
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "prompts_per_second": len(replies) / seconds,
    }
    ttfts = sorted({r.ttft_s for r in generated if r.ttft_s is not None})
    log.info(
        "batch: %d prompts (%d answered by triage) in %.2f s: %d new tokens, %.1f tokens/s, %.2f prompts/s "
        "overall; time to first token per batch %s s",
        stats["prompts"],
        stats["answered_by_triage"],
        seconds,
        tokens,
        stats["tokens_per_second"],
        stats["prompts_per_second"],
        ", ".join(f"{t:.3f}" for t in ttfts) or "-",
    )
    log.info("responses written to %s", output)
    return stats


def chat(assistant: Assistant, stdin=None, out=None) -> None:
    """A multi-turn chat on stdin, each reply streamed as the safety checks release it."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    print("chat: type a message and press Enter; /reset clears the history, /exit or Ctrl-D ends.", file=sys.stderr)
    history: list[dict] = []
    try:
        while _chat_turn(assistant, stdin, out, history):
            pass
    except KeyboardInterrupt:  # Ctrl-C ends the chat like Ctrl-D
        out.write("\n")


def _chat_turn(assistant: Assistant, stdin, out, history: list[dict]) -> bool:
    """Read one line and answer it; False when the chat is over."""
    out.write("you> ")
    out.flush()
    line = stdin.readline()
    text = line.strip()
    if not line or text == "/exit":
        out.write("\n")
        return False
    if text == "/reset":
        history.clear()
    elif text:
        history.append({"role": "user", "content": text})
        out.write("assistant> ")
        reply = assistant.reply(history, on_text=_writer(out))
        out.write("\n")
        # the history keeps what the user saw, so the next turn builds on the checked reply
        history.append({"role": "assistant", "content": reply.text})
        _log_reply(reply)
    return True


def _writer(out):
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write


def _log_reply(reply: Reply) -> None:
    if not reply.model_called:
        log.info("safety: triage answered (%s: %s); the model was not called", reply.action, ", ".join(reply.rule_ids))
        return
    log.info(
        "time to first token %.3f s; %d new tokens in %.2f s (%.1f tokens/s); output check: %s%s",
        reply.ttft_s or 0.0,
        reply.new_tokens,
        reply.seconds,
        reply.tokens_per_second,
        reply.action,
        f" ({', '.join(reply.rule_ids)})" if reply.rule_ids else "",
    )


def run(cfg: DictConfig, info) -> None:
    """One session: check everything, then export and/or answer; nothing is written before the checks pass."""
    source, prompt, rows = check_request(cfg, info)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    set_seed(cfg.seed)
    adapter_sha256 = sha256_file(next(source.adapter_dir.glob("adapter_model.*")))
    audit = open_audit(cfg, info.output_dir, source, adapter_sha256)
    if cfg.export.merged_dir or cfg.export.log_model:
        exporter.export(cfg, source, audit)
    if prompt is None and rows is None and not cfg.chat:
        return
    model, tokenizer, _ = load_adapter_model(cfg, source, device, precision)
    log.info(
        "adapter %s%s on %s, %s on %s",
        source.adapter_dir,
        describe_run(source),
        cfg.model.base_model,
        precision,
        device,
    )
    assistant = Assistant(merged_for_speed(model, cfg), tokenizer, cfg, audit, adapter_sha256)
    if prompt is not None:
        answer_prompt(assistant, prompt)
    elif rows is not None:
        answer_file(assistant, rows, Path(cfg.output) if cfg.output else info.output_dir / "responses.jsonl")
    else:
        chat(assistant)
    if audit is not None:
        log.info("audit trail: %s (head %s)", audit.path, audit.head)


def describe_run(source: Source) -> str:
    return f" (MLflow run {source.run_id})" if source.run_id else ""


def merged_for_speed(model, cfg: DictConfig):
    if not cfg.inference.merge_adapter:
        return model
    if cfg.model.quantization != "none":
        log.info(
            "inference.merge_adapter skipped: merging into %s weights would round the adapter away",
            cfg.model.quantization,
        )
        return model
    return model.merge_and_unload()
