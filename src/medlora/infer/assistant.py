"""The assistant: every answer goes through the safety layer, read top to bottom:

triage the latest user message -> (emergency, crisis, refuse: the fixed reply; the model is not
called) -> system prompt + history -> base model + adapter generate -> output checks -> reply.

Each call writes two audit entries (`inference_triage`, `output_check`) holding hashes and counts;
raw text only with `safety.audit.include_raw=true`.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import GenerationConfig, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from medlora import data as medata
from medlora.audit import AuditTrail
from medlora.config import MedloraError
from medlora.files import sha256_text

log = logging.getLogger(__name__)

TRIAGE_ANSWERS = ("emergency", "crisis", "refuse")
UNCHECKED = "unchecked"  # the action when that safety step is turned off (safety.*.enabled=false)


def generation_config(model, tokenizer, inference: DictConfig) -> GenerationConfig:
    config = copy.deepcopy(model.generation_config)
    sampling = (
        dict(temperature=inference.temperature, top_p=inference.top_p)
        if inference.do_sample
        else dict(temperature=None, top_p=None, top_k=None)
    )
    # use_cache: load_model turns the KV cache off for training; generation needs it
    config.update(
        do_sample=inference.do_sample,
        max_new_tokens=inference.max_new_tokens,
        repetition_penalty=inference.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )
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
                    log.info(
                        "triage: rules and the model %s (%s)",
                        settings.get("model"),
                        getattr(self.triage.model, "compute", "guard"),
                    )
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
        return {
            "response": self.text,
            "action": self.action,
            "categories": self.categories,
            "rule_ids": self.rule_ids,
            "model_called": self.model_called,
            "new_tokens": self.new_tokens,
            "ttft_s": _round(self.ttft_s),
            "tokens_per_second": _round(self.tokens_per_second),
        }


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
            self.emit(candidate[len(self.shown) :])
            self.shown = candidate
        else:
            self.holding = True

    def finish(self, final: str) -> None:
        if final.startswith(self.shown):
            self.emit(final[len(self.shown) :])
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
        return result["ids"][0, inputs["input_ids"].shape[1] :], seconds, ttft

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
            chunk = todo[start : start + self.batch_size]
            inputs = self._encode([conversations[i] for i in chunk])
            timer = _Timer()
            began = time.perf_counter()
            output = self.model.generate(**inputs, generation_config=self.generation, streamer=timer)
            seconds = time.perf_counter() - began
            ttft = timer.first_token_at - began if timer.first_token_at else None
            new = output[:, inputs["input_ids"].shape[1] :]
            for row, i in enumerate(chunk):
                replies[i] = self._checked(new[row], seconds, ttft)
        return replies

    # -- shared steps ------------------------------------------------------------------------

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            medata.with_system_prompt(messages, self.system_prompt), tokenize=False, add_generation_prompt=True
        )

    def _encode(self, conversations: list[list[dict]]) -> dict:
        # the template already holds the special tokens, as in training
        encoded = self.tokenizer(
            [self._render(m) for m in conversations], return_tensors="pt", padding=True, add_special_tokens=False
        )
        return {k: v.to(self.model.device) for k, v in encoded.items()}

    def _triage(self, messages: list[dict], decision) -> Reply | None:
        """The fixed reply when triage answers the message, else None (the model answers)."""
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        action = decision.action if decision else UNCHECKED
        scores = {k: round(v, 4) for k, v in decision.scores.items()} if decision and decision.scores else None
        self._record(
            "inference_triage",
            action,
            decision,
            inputs={"prompt": sha256_text(user)},
            counts={"prompt_chars": len(user), "turns": len(messages)},
            raw={"prompt": user},
            source=decision.source if decision else "",
            **({"model_scores": scores} if scores else {}),
        )
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
        self._record(
            "output_check",
            action,
            decision,
            inputs={"response_raw": sha256_text(raw), "adapter_model": self.adapter_sha256},
            outputs={"response": sha256_text(text)},
            counts={"new_tokens": n, "raw_chars": len(raw), "response_chars": len(text)},
            raw={"response_raw": raw, "response": text},
        )
        return Reply(
            text,
            action,
            list(decision.categories) if decision else [],
            list(decision.rule_ids) if decision else [],
            True,
            raw,
            n,
            ttft,
            seconds,
        )

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
        self.audit.record(
            event, outcome=action, rule_ids=list(decision.rule_ids) if decision else [], **entry, **details
        )
