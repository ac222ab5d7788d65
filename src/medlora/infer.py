"""Inference through the safety layer, read top to bottom:

triage the latest user message -> (emergency, crisis, refuse: the fixed reply; the model is not
called) -> system prompt + history -> base model + adapter generate -> output checks -> reply.

Each call writes two audit entries (`inference_triage`, `output_check`) holding hashes and counts;
raw text only with `safety.audit.include_raw=true`.
"""

from __future__ import annotations

import copy
import getpass
import json
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import GenerationConfig, TextIteratorStreamer, set_seed
from transformers.generation.streamers import BaseStreamer

from medlora import data as medata
from medlora.audit import AuditTrail, sha256_file, sha256_text
from medlora.config import (MedloraError, require, require_positive, resolve_device, resolve_precision, validate_model,
                            validate_safety)
from medlora.files import save_folder as save_atomically
from medlora.model import load_model, load_tokenizer, resolve_checkpoint
from medlora.tracking import git_commit

log = logging.getLogger(__name__)

RUN_PREFIX = "runs:/"
# what an adapter brings back from its training run; seed too, because it builds tiny_random's weights
BROUGHT_BACK = ("model", "safety", "seed")
TRIAGE_ANSWERS = ("emergency", "crisis", "refuse")
UNCHECKED = "unchecked"  # the action when that safety step is turned off (safety.*.enabled=false)


# --------------------------------------------------------------------------------------------
# config


def validate(cfg: DictConfig) -> None:
    """Check what inference reads, before anything loads."""
    validate_model(cfg.model)
    validate_safety(cfg.safety)
    inference = cfg.inference
    for key in ("max_new_tokens", "batch_size"):
        value = inference[key]
        require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"inference.{key}={value!r} is invalid: it must be a positive integer.")
    require_positive(inference.temperature, "inference.temperature", "Typical values are 0.2 to 1.0.")
    require(isinstance(inference.top_p, (int, float)) and 0 < inference.top_p <= 1,
            f"inference.top_p={inference.top_p!r} is invalid: it must be in (0, 1], e.g. 0.9.")
    require_positive(inference.repetition_penalty, "inference.repetition_penalty", "Use 1.0 to turn it off.")


# --------------------------------------------------------------------------------------------
# where the adapter comes from


@dataclass
class Source:
    adapter_dir: Path
    run_id: str | None = None  # the MLflow training run, when the adapter came from one
    trained: DictConfig | None = None  # that run's resolved config, where it was found


def find_source(cfg: DictConfig) -> Source:
    spec, run_id = cfg.adapter, cfg.run_id
    require(not (spec and run_id), "give the adapter once: adapter=<folder or runs:/<id>> or run_id=<id>, not both.")
    require(bool(spec or run_id), "no adapter given: pass adapter=outputs/runs/<time>/adapter, "
                                  "adapter=runs:/<mlflow run id> or run_id=<mlflow run id>.")
    if run_id is not None or str(spec).startswith(RUN_PREFIX):
        require(isinstance(run_id or spec, str),
                 f"run_id={run_id} was read as a number: quote it, e.g. run_id=\"'{run_id}'\".")
        run_id, _, artifact = (run_id or spec[len(RUN_PREFIX):]).partition("/")
        require(artifact.strip("/") in ("", "adapter"), f"adapter={spec}: give runs:/<run id>; the adapter is "
                                                          "the run's `adapter` artifact.")
        return _from_run(cfg, run_id)
    folder = Path(str(spec)).expanduser()
    require(folder.is_dir(), f"adapter={spec} does not exist: give a training run's adapter folder, e.g. "
                              "outputs/runs/<time>/adapter, or adapter=runs:/<mlflow run id>.")
    require((folder / "adapter_config.json").is_file(),
            f"adapter={spec} is not an adapter folder (no adapter_config.json): give the `adapter` folder "
            "inside a training run's folder.")
    # train.py writes the resolved config next to the adapter: it names the model it was trained on
    beside = folder.resolve().parent / "config_resolved.yaml"
    return Source(folder.resolve(), trained=OmegaConf.load(beside) if beside.is_file() else None)


def _from_run(cfg: DictConfig, run_id: str) -> Source:
    tracking = cfg.tracking
    require(bool(tracking.enabled and tracking.uri), f"run {run_id} is an MLflow run, but tracking is off: "
            "use tracking=mlflow (the default store) or set tracking.uri to the store that holds the run.")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking.uri)
    try:
        client.get_run(run_id)
        names = {a.path for a in client.list_artifacts(run_id)}
    except MlflowException as err:
        raise MedloraError(f"no MLflow run {run_id} in tracking.uri={tracking.uri} "
                           f"({str(err).splitlines()[0]}). Check the id: the training log prints it, and "
                           "`make ui` lists every run.") from err
    require("adapter" in names, f"MLflow run {run_id} has no `adapter` artifact (was it trained with "
                                 "tracking.log_adapter=false?): give its folder instead, "
                                 "adapter=outputs/runs/<time>/adapter.")
    # run artifacts never change, so one download per run is enough
    target = Path(cfg.paths.cache_dir) / "runs" / run_id
    if not (target / "adapter" / "adapter_config.json").is_file():
        wanted = ["adapter", *(["config_resolved.yaml"] if "config_resolved.yaml" in names else [])]
        save_atomically(target, lambda folder: _download(tracking.uri, run_id, wanted, folder),
                        cache_entry="adapter/adapter_config.json")
    trained = target / "config_resolved.yaml"
    return Source(target / "adapter", run_id, OmegaConf.load(trained) if trained.is_file() else None)


def _download(uri: str, run_id: str, artifacts: list[str], folder: Path) -> None:
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a few local files: no bar needed
    for artifact in artifacts:
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(folder),
                                            tracking_uri=uri)


def use_training_config(cfg: DictConfig, trained: DictConfig, overrides: list[str]) -> list[str]:
    """Bring back the model, safety settings and seed the adapter was trained with, in place.

    Keys missing from an older run keep today's defaults, and whatever the user set on the
    command line (`model=...`, `safety.triage.enabled=false`) still wins. Returns what came back.
    """
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    original = copy.deepcopy(cfg)
    brought = []
    with open_dict(cfg):
        for section in BROUGHT_BACK:
            if section in given or section not in trained:
                continue
            mine = cfg[section]
            cfg[section] = (OmegaConf.merge(OmegaConf.to_container(mine), trained[section])
                            if isinstance(mine, DictConfig) else trained[section])
            for key in sorted(k for k in given if k.startswith(f"{section}.")):
                OmegaConf.update(cfg, key, OmegaConf.select(original, key), force_add=True)
            brought.append(section)
    return brought


# --------------------------------------------------------------------------------------------
# the model


def load_adapter_model(cfg: DictConfig, source: Source, device: str, precision: str,
                       model_cfg: DictConfig | None = None):
    """Base model + adapter, in eval mode; returns (peft model, tokenizer, base checkpoint path)."""
    from peft import PeftModel

    model_cfg = model_cfg if model_cfg is not None else cfg.model
    base_path, tokenizer_path = resolve_checkpoint(model_cfg, cfg.paths.cache_dir, cfg.seed)
    check_base_model(source.adapter_dir, base_path, model_cfg)
    # the adapter folder carries the tokenizer and chat template it was trained with
    if (source.adapter_dir / "tokenizer_config.json").is_file():
        tokenizer_path = str(source.adapter_dir)
    tokenizer = load_tokenizer(tokenizer_path, model_cfg.trust_remote_code)
    base = load_model(base_path, model_cfg, precision, device)
    if not getattr(base, "is_quantized", False):
        base = base.to(device)  # a quantized model is already placed by its device_map
    try:
        model = PeftModel.from_pretrained(base, str(source.adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        raise MedloraError(f"the adapter {source.adapter_dir} does not fit model.base_model={model_cfg.base_model} "
                           f"({str(err).splitlines()[0][:300]}). Use the model it was trained on: "
                           "adapter=runs:/<run id> brings it back.") from err
    model.eval()
    return model, tokenizer, base_path


def check_base_model(adapter_dir: Path, base_path: str, model_cfg: DictConfig) -> None:
    """Refuse an adapter trained on another base model: its weights would load and produce nonsense."""
    from peft import PeftConfig

    recorded = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not recorded or _same_model(recorded, str(base_path)):
        return
    raise MedloraError(f"the adapter {adapter_dir} was trained on base model {recorded}, but model.base_model="
                       f"{model_cfg.base_model} loads {base_path}. Use the model it was trained on: "
                       "adapter=runs:/<run id> or a training run's adapter folder brings it back; or set model=... "
                       "to match.")


def _same_model(recorded: str, loaded: str) -> bool:
    if recorded == loaded:
        return True
    if not Path(loaded).is_dir():  # a Hub id: only the same id is the same model
        return False
    # a local checkpoint: the same folder named another way (relative, moved cache), or a
    # download of the recorded Hub id; medlora's cache folders are named by a hash of the weights
    return Path(recorded).resolve().name == Path(loaded).resolve().name


def generation_config(model, tokenizer, inference: DictConfig) -> GenerationConfig:
    config = copy.deepcopy(model.generation_config)
    sampling = (dict(temperature=inference.temperature, top_p=inference.top_p) if inference.do_sample
                else dict(temperature=None, top_p=None, top_k=None))
    # use_cache: load_model turns the KV cache off for training; generation needs it
    config.update(do_sample=inference.do_sample, max_new_tokens=inference.max_new_tokens,
                  repetition_penalty=inference.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                  use_cache=True, **sampling)
    return config


# --------------------------------------------------------------------------------------------
# the safety layer


class SafetyLayer:
    """Triage before the model and output checks after it, each switched by its `enabled` key."""

    def __init__(self, safety: DictConfig, cache_dir: str | None = None, device: str = "cpu"):
        self.triage = self.checker = None
        try:
            if safety.triage.enabled:
                from medlora.safety.triage import Triage

                settings = OmegaConf.to_container(safety.triage, resolve=True)
                self.triage = Triage.from_config(settings, cache_dir, device) if cache_dir else Triage(settings)
                if self.triage.model is not None:
                    log.info("triage: rules and the model %s (%s)", settings.get("model"),
                             getattr(self.triage.model, "compute", "guard"))
            if safety.output_checks.enabled:
                from medlora.safety.output_checks import OutputChecker

                self.checker = OutputChecker(OmegaConf.to_container(safety.output_checks, resolve=True))
        except ValueError as err:  # the safety modules' config errors name the key and the fix
            raise MedloraError(f"safety config: {err}") from err

    def check_inputs(self, conversations: list[list[dict]]) -> list:
        if self.triage is None:
            return [None] * len(conversations)
        return self.triage.check_many(conversations)

    def check_output(self, text: str):
        if self.checker is None:
            return None
        return self.checker.check(text)


@dataclass
class Reply:
    """One answer and how it was made. `action` is triage's when it answered, else the output check's."""

    text: str
    action: str
    categories: list[str] = field(default_factory=list)
    rule_ids: list[str] = field(default_factory=list)
    model_called: bool = False
    raw: str | None = None  # the model's own words, before the output checks
    new_tokens: int = 0  # tokens generated, up to and including the end-of-turn token
    ttft_s: float | None = None  # from calling generate() to the first new token (prefill included)
    seconds: float = 0.0  # the whole generate() call

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def as_row(self) -> dict:
        return {"response": self.text, "action": self.action, "categories": self.categories,
                "rule_ids": self.rule_ids, "model_called": self.model_called, "new_tokens": self.new_tokens,
                "ttft_s": _round(self.ttft_s), "tokens_per_second": _round(self.tokens_per_second)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class _Timer(BaseStreamer):
    """Times generate() for another streamer (or none): put() #1 is the prompt, put() #2 the first new token."""

    def __init__(self, inner: BaseStreamer | None = None):
        self.inner, self.puts, self.first_token_at = inner, 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")


class _ReleaseGate:
    """Streams text a sentence at a time, and only while everything so far passes the output checks.

    Streaming raw tokens would show the user words the output checks are there to stop; holding
    back to the last checked sentence keeps streaming without that hole. Once a prefix fails,
    nothing more is shown until the whole reply has been checked.
    """

    def __init__(self, passes, emit):
        self.passes, self.emit = passes, emit
        self.text, self.shown, self.holding = "", "", False

    def add(self, chunk: str) -> None:
        self.text = (self.text + chunk).lstrip()  # the checked reply is stripped too, so prefixes line up
        ends = [m.end() for m in SENTENCE_END.finditer(self.text, len(self.shown))]
        if self.holding or not ends:
            return
        candidate = self.text[: ends[-1]]
        if self.passes(candidate):
            self.emit(candidate[len(self.shown):])
            self.shown = candidate
        else:
            self.holding = True

    def finish(self, final: str) -> None:
        if final.startswith(self.shown):
            self.emit(final[len(self.shown):])
        else:
            self.emit("\n[the text above was withdrawn by the safety checks; the checked reply follows]\n" + final)


class Assistant:
    """Answers conversations through the safety layer and writes the audit trail."""

    def __init__(self, model, tokenizer, cfg: DictConfig, audit: AuditTrail | None, adapter_sha256: str):
        self.model, self.tokenizer = model, tokenizer
        self.tokenizer.padding_side = "left"  # generation appends on the right, so pads go left
        self.system_prompt = cfg.safety.system_prompt
        self.safety = SafetyLayer(cfg.safety, cfg.paths.cache_dir, str(model.device))
        self.generation = generation_config(model, tokenizer, cfg.inference)
        self.batch_size = cfg.inference.batch_size
        self.include_raw = bool(cfg.safety.audit.include_raw)
        self.audit, self.adapter_sha256 = audit, adapter_sha256
        eos = self.generation.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])

    # -- one conversation, streamed ----------------------------------------------------------

    def reply(self, messages: list[dict], on_text=None) -> Reply:
        """Answer the last user message of `messages`; `on_text` receives the reply as it is released."""
        emit = on_text or (lambda text: None)
        answered = self._triage(messages, self.safety.check_inputs([messages])[0])
        if answered is not None:
            emit(answered.text)
            return answered
        inputs = self._encode([messages])
        gate = _ReleaseGate(self._passes, emit)
        ids, seconds, ttft = self._generate_streamed(inputs, gate.add)
        reply = self._checked(ids, seconds, ttft)
        gate.finish(reply.text)
        return reply

    def _generate_streamed(self, inputs: dict, on_chunk) -> tuple[torch.Tensor, float, float | None]:
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        timer, result = _Timer(streamer), {}

        def work() -> None:
            try:
                result["ids"] = self.model.generate(**inputs, generation_config=self.generation, streamer=timer)
            except BaseException as err:  # re-raised below, in the caller's thread
                result["error"] = err
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        for chunk in streamer:
            on_chunk(chunk)
        thread.join()
        seconds = time.perf_counter() - start
        if "error" in result:
            raise result["error"]
        ttft = timer.first_token_at - start if timer.first_token_at else None
        return result["ids"][0, inputs["input_ids"].shape[1]:], seconds, ttft

    # -- many conversations, batched ---------------------------------------------------------

    def reply_batch(self, conversations: list[list[dict]]) -> list[Reply]:
        """Answer each conversation; those triage lets through are generated `batch_size` at a time."""
        decisions = self.safety.check_inputs(conversations)
        replies: list[Reply | None] = [self._triage(m, d) for m, d in zip(conversations, decisions)]
        todo = [i for i, reply in enumerate(replies) if reply is None]
        # longest first, so each batch holds prompts of similar length and little compute goes to padding
        lengths = {i: len(self._render(conversations[i])) for i in todo}
        todo.sort(key=lambda i: -lengths[i])
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start: start + self.batch_size]
            inputs = self._encode([conversations[i] for i in chunk])
            timer = _Timer()
            began = time.perf_counter()
            output = self.model.generate(**inputs, generation_config=self.generation, streamer=timer)
            seconds = time.perf_counter() - began
            ttft = timer.first_token_at - began if timer.first_token_at else None
            new = output[:, inputs["input_ids"].shape[1]:]
            for row, i in enumerate(chunk):
                replies[i] = self._checked(new[row], seconds, ttft)
        return replies

    # -- shared steps ------------------------------------------------------------------------

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(medata.with_system_prompt(messages, self.system_prompt),
                                                  tokenize=False, add_generation_prompt=True)

    def _encode(self, conversations: list[list[dict]]) -> dict:
        # the template already holds the special tokens, as in training
        encoded = self.tokenizer([self._render(m) for m in conversations], return_tensors="pt", padding=True,
                                 add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in encoded.items()}

    def _triage(self, messages: list[dict], decision) -> Reply | None:
        """The fixed reply when triage answers the message, else None (the model answers)."""
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        action = decision.action if decision else UNCHECKED
        scores = {k: round(v, 4) for k, v in decision.scores.items()} if decision and decision.scores else None
        self._record("inference_triage", action, decision, inputs={"prompt": sha256_text(user)},
                     counts={"prompt_chars": len(user), "turns": len(messages)}, raw={"prompt": user},
                     source=decision.source if decision else "", **({"model_scores": scores} if scores else {}))
        if action not in TRIAGE_ANSWERS:
            return None
        return Reply(decision.reply, action, list(decision.categories), list(decision.rule_ids))

    def _passes(self, text: str) -> bool:
        decision = self.safety.check_output(text)
        return decision is None or decision.action == "pass"

    def _checked(self, ids: torch.Tensor, seconds: float, ttft: float | None) -> Reply:
        """Decode the new tokens and pass them through the output checks."""
        n = self._length(ids)
        raw = self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
        decision = self.safety.check_output(raw)
        text = decision.text if decision else raw
        action = decision.action if decision else UNCHECKED
        self._record("output_check", action, decision,
                     inputs={"response_raw": sha256_text(raw), "adapter_model": self.adapter_sha256},
                     outputs={"response": sha256_text(text)},
                     counts={"new_tokens": n, "raw_chars": len(raw), "response_chars": len(text)},
                     raw={"response_raw": raw, "response": text})
        return Reply(text, action, list(decision.categories) if decision else [],
                     list(decision.rule_ids) if decision else [], True, raw, n, ttft, seconds)

    def _length(self, ids: torch.Tensor) -> int:
        """New tokens up to and including the first end-of-turn token; what follows is padding."""
        for position, token in enumerate(ids.tolist()):
            if token in self.stop_ids:
                return position + 1
        return len(ids)

    def _record(self, event: str, action: str, decision, raw: dict, **entry) -> None:
        if self.audit is None:
            return
        details = {"categories": list(decision.categories) if decision else []}
        if self.include_raw:
            details["raw"] = raw
        self.audit.record(event, outcome=action, rule_ids=list(decision.rule_ids) if decision else [],
                          **entry, **details)


# --------------------------------------------------------------------------------------------
# the session: audit trail, modes


def open_audit(cfg: DictConfig, output_dir: Path, source: Source, adapter_sha256: str) -> AuditTrail | None:
    if not cfg.safety.audit.enabled:
        return None
    # the hash names what answers: model, adapter weights, safety and generation settings
    setup = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "safety", "inference")}
    setup["adapter_model"] = adapter_sha256
    return AuditTrail(output_dir / "audit.jsonl", actor=f"{getpass.getuser()}@{socket.gethostname()}",
                      run_id=f"infer:{output_dir.name}" + (f":from:{source.run_id}" if source.run_id else ""),
                      config_hash=sha256_text(json.dumps(setup, sort_keys=True)),
                      git_commit=git_commit(cfg.paths.root_dir))


def read_prompts(path: str) -> list[tuple[dict, list[dict]]]:
    """(row to echo, conversation) per line: {"prompt": ...} or {"messages": [...]}, plus an optional "id"."""
    require(Path(path).is_file(), f"input={path} does not exist: give a JSONL file of prompts, one "
                                   "{\"prompt\": \"...\"} per line.")
    rows = []
    for number, row in medata.read_jsonl(path):
        where = f"{path}:{number}"
        if "messages" in row:
            messages = row["messages"]
            ok = isinstance(messages, list) and messages and all(
                isinstance(m, dict) and m.get("role") in medata.ROLES and isinstance(m.get("content"), str)
                for m in messages)
            require(bool(ok), f"{where}: `messages` must be a list of {{role, content}} objects.")
            require(messages[-1]["role"] == "user", f"{where}: the last message must be the user's, to be answered.")
        else:
            prompt = row.get("prompt")
            require(isinstance(prompt, str), f"{where}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}, "
                                              f"got keys {sorted(row)}.")
            messages = [{"role": "user", "content": prompt}]
        require(bool(messages[-1]["content"].strip()), f"{where}: the prompt is empty.")
        echo = {"line": number, **({"id": row["id"]} if "id" in row else {}), "prompt": messages[-1]["content"]}
        rows.append((echo, [{"role": m["role"], "content": m["content"]} for m in messages]))
    require(bool(rows), f"input={path} holds no prompts: the file is empty. Give one {{\"prompt\": \"...\"}} "
                         "per line.")
    return rows


def write_jsonl_atomically(path: Path, rows: list[dict]) -> None:
    """All lines or none: a crash halfway leaves no partial file that looks like a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    write_jsonl_atomically(output, [{**echo, **reply.as_row()} for (echo, _), reply in zip(rows, replies)])
    generated = [r for r in replies if r.model_called]
    tokens = sum(r.new_tokens for r in generated)
    stats = {"prompts": len(replies), "answered_by_triage": len(replies) - len(generated), "new_tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds, "prompts_per_second": len(replies) / seconds}
    ttfts = sorted({r.ttft_s for r in generated if r.ttft_s is not None})
    log.info("batch: %d prompts (%d answered by triage) in %.2f s: %d new tokens, %.1f tokens/s, %.2f prompts/s "
            "overall; time to first token per batch %s s", stats["prompts"], stats["answered_by_triage"], seconds,
            tokens, stats["tokens_per_second"], stats["prompts_per_second"],
            ", ".join(f"{t:.3f}" for t in ttfts) or "-")
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
    log.info("time to first token %.3f s; %d new tokens in %.2f s (%.1f tokens/s); output check: %s%s",
            reply.ttft_s or 0.0, reply.new_tokens, reply.seconds, reply.tokens_per_second, reply.action,
            f" ({', '.join(reply.rule_ids)})" if reply.rule_ids else "")


def run(cfg: DictConfig, info) -> None:
    """One session: check everything, then export and/or answer; nothing is written before the checks pass."""
    source, prompt, rows = check_request(cfg, info)
    from medlora import export as exporter  # imported here: export builds on this module

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
    log.info("adapter %s%s on %s, %s on %s", source.adapter_dir, describe_run(source), cfg.model.base_model, precision,
            device)
    assistant = Assistant(merged_for_speed(model, cfg), tokenizer, cfg, audit, adapter_sha256)
    if prompt is not None:
        answer_prompt(assistant, prompt)
    elif rows is not None:
        answer_file(assistant, rows, Path(cfg.output) if cfg.output else info.output_dir / "responses.jsonl")
    else:
        chat(assistant)
    if audit is not None:
        log.info("audit trail: %s (head %s)", audit.path, audit.head)


def check_request(cfg: DictConfig, info) -> tuple[Source, str | None, list | None]:
    """Everything that can reject the request, before any model loads: (source, prompt, prompt file rows)."""
    from medlora import export as exporter

    modes = [name for name in ("prompt", "input", "chat") if cfg[name] not in (None, False)]
    require(len(modes) <= 1, f"give one of prompt=..., input=... or chat=true, not {' and '.join(modes)}.")
    require(bool(modes) or bool(cfg.export.merged_dir or cfg.export.log_model),
            "nothing to do: give prompt=\"...\", input=prompts.jsonl, chat=true, or export.merged_dir=<folder> / "
            "export.log_model=true.")
    prompt = None if cfg.prompt is None else str(cfg.prompt)  # Hydra reads prompt=42 as a number
    require(prompt is None or bool(prompt.strip()),
            "prompt is empty: give the question, e.g. prompt=\"What is a normal resting heart rate?\".")
    source = find_source(cfg)
    if source.trained is not None:
        brought = use_training_config(cfg, source.trained, list(info.overrides))
        log.info("from the adapter's training run: %s (model.base_model=%s)", ", ".join(brought) or "nothing",
                 cfg.model.base_model)
    validate(cfg)
    if cfg.safety.triage.enabled:
        from medlora.safety import triage_model

        triage_model.check(cfg.safety.triage.get("model"))
    exporter.check_target(cfg)
    rows = read_prompts(str(cfg.input)) if cfg.input else None
    check_base_model(source.adapter_dir, resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)[0], cfg.model)
    return source, prompt, rows


def describe_run(source: Source) -> str:
    return f" (MLflow run {source.run_id})" if source.run_id else ""


def merged_for_speed(model, cfg: DictConfig):
    if not cfg.inference.merge_adapter:
        return model
    if cfg.model.quantization != "none":
        log.info("inference.merge_adapter skipped: merging into %s weights would round the adapter away",
                 cfg.model.quantization)
        return model
    return model.merge_and_unload()
