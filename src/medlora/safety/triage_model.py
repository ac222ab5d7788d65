"""The learned triage model: a LoRA adapter on a small chat model that reads the whole conversation and
answers one label (emergency, crisis, refuse, allow), scored from one forward pass: the label words'
first-token log-probabilities at the answer position, not free generation.

An adapter folder holds peft's files and `triage.json`: the instruction and label words it was trained
with, the `model` config of its base, the per-class thresholds chosen on the validation split (recall
first), its validation figures and the SHA-256 of its weights, checked on load. `make safety-model`
builds one; `safety.triage.model` names it. Any other Hugging Face id is loaded as a generative guard
model (Llama Guard and its kind, `GuardModel`), its categories mapped to the four actions.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from medlora.config import MedloraError
from medlora.files import sha256_file

log = logging.getLogger(__name__)

LABELS = ("emergency", "crisis", "refuse", "allow")
FLAGGED = LABELS[:3]  # checked in this order: the first whose score reaches its threshold is the answer
MANIFEST = "triage.json"
WEIGHTS = "adapter_model.safetensors"
REBUILD = "rebuild it with `make safety-model`, or set safety.triage.model=null for rules only"
_MARK = "\x00conversation\x00"


class TriageModelError(MedloraError):
    """The triage model cannot be used: the message names the file and how to rebuild it."""


# ---------------------------------------------------------------------------------------------
# what the classifier reads: training and inference render a conversation with the same functions


def _clip(text: str, limit: int) -> str:
    """At most `limit` characters, keeping the beginning and the end: a long message's point can be in either."""
    if len(text) <= limit:
        return text
    head = limit // 2
    return text[:head] + " … " + text[len(text) - (limit - head - 3) :]


def transcript(messages: Sequence[Mapping], max_chars: int) -> str:
    """The latest user turn, and before it as many earlier turns as fit in `max_chars`, newest kept."""
    turns = [
        (m["role"], " ".join(str(m.get("content") or "").split()))
        for m in messages
        if m.get("role") in ("user", "assistant")
    ]
    while turns and turns[-1][0] != "user":  # the label is about the conversation as of its last user turn
        turns.pop()
    if not turns:
        return ""
    latest = _clip(turns[-1][1], max_chars)
    if len(turns) == 1:
        return latest
    budget, earlier = max_chars - len(latest), []
    for role, text in reversed(turns[:-1]):
        line = f"{role.capitalize()}: {_clip(text, 600)}"
        if budget - len(line) < 0:
            break
        earlier.append(line)
        budget -= len(line) + 1
    if not earlier:
        return latest
    return "Earlier in the conversation:\n" + "\n".join(reversed(earlier)) + "\n\nLatest message:\n" + latest


def classifier_messages(instruction: str, messages: Sequence[Mapping], max_chars: int) -> list[dict]:
    return [{"role": "system", "content": instruction}, {"role": "user", "content": transcript(messages, max_chars)}]


# ---------------------------------------------------------------------------------------------
# finding and checking an adapter folder

# what the Hub accepts as a repository id: "name" or "owner/name"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_spec(spec: str) -> Path | None:
    """A folder for `spec` (a path, or `package/folder` inside an installed package), or None for a Hub id."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    package, _, rest = str(spec).partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() and rest else None
    if found is not None and found.submodule_search_locations:
        candidate = Path(next(iter(found.submodule_search_locations))) / rest
        # a folder medlora ships that is missing is a broken install, not a Hub id
        if candidate.exists() or package == "medlora":
            return candidate
    if not _HUB_ID.fullmatch(str(spec)):  # "/x/y", "./x", "a/b/c": meant as a folder, so it is missing
        return path
    return None


def read_manifest(folder: Path) -> dict:
    """triage.json of `folder`, after checking that every file it needs is there and the weights are unchanged."""
    if not folder.is_dir():
        raise TriageModelError(f"safety.triage.model: {folder} does not exist: {REBUILD}.")
    manifest_path = folder / MANIFEST
    for path in (manifest_path, folder / "adapter_config.json", folder / WEIGHTS):
        if not path.is_file():
            raise TriageModelError(f"safety.triage.model: {path} is missing: {REBUILD}.")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        missing = [k for k in ("instruction", "labels", "model", "thresholds", "max_chars") if k not in manifest]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise TriageModelError(f"safety.triage.model: {manifest_path} is corrupt ({err}): {REBUILD}.") from err
    if missing or list(manifest["labels"]) != list(LABELS):
        raise TriageModelError(
            f"safety.triage.model: {manifest_path} is not a triage manifest (missing "
            f"{missing or 'the four labels'}): {REBUILD}."
        )
    expected = manifest.get("weights_sha256")
    if expected and sha256_file(folder / WEIGHTS) != expected:
        raise TriageModelError(
            f"safety.triage.model: {folder / WEIGHTS} is corrupt or was changed (its SHA-256 "
            f"differs from the one in {MANIFEST}): {REBUILD}."
        )
    return manifest


# ---------------------------------------------------------------------------------------------
# the model


class TriageModel:
    """Scores conversations with a triage adapter merged into its base.

    On a CPU the merged decoder runs with int8 dynamic quantization when triage.json says
    `"compute": "int8"`: faster than fp32, but with scores that move away from fp32's
    (bench/results/triage.md); the shipped adapter says fp32. The instruction every conversation
    begins with runs once, at load; each call computes only the conversation's own tokens against
    its keys and values, and the LM head only for the four label tokens.
    """

    def __init__(
        self, folder: Path, cache_dir: str, device: str = "cpu", batch_size: int = 16, compute: str | None = None
    ):
        import torch
        from omegaconf import OmegaConf
        from peft import PeftModel
        from transformers.utils import logging as hf_logging

        from medlora.model import load_model, load_tokenizer, resolve_checkpoint

        self.folder, self.device, self.batch_size = Path(folder), device, batch_size
        manifest = read_manifest(self.folder)
        self.manifest = manifest
        self.instruction, self.max_chars = manifest["instruction"], int(manifest["max_chars"])
        self.thresholds = {label: float(manifest["thresholds"][label]) for label in FLAGGED}
        model_cfg = OmegaConf.create(manifest["model"])
        model_path, tokenizer_path = resolve_checkpoint(model_cfg, cache_dir, int(manifest.get("seed", 42)))
        self.tokenizer = load_tokenizer(tokenizer_path, model_cfg.get("trust_remote_code", False))
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a triage model loads inside other commands' output
        try:
            base = load_model(model_path, model_cfg, "fp32", device)
            try:
                model = PeftModel.from_pretrained(base, str(self.folder)).merge_and_unload()
            except Exception as err:  # safetensors, peft and torch each raise their own kinds for a damaged file
                raise TriageModelError(
                    f"safety.triage.model: {self.folder / WEIGHTS} could not be loaded "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]}): {REBUILD}."
                ) from err
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model.eval()
        ids = [self.tokenizer.encode(word, add_special_tokens=False)[0] for word in LABELS]
        if len(set(ids)) != len(ids):
            raise TriageModelError(
                f"safety.triage.model: the labels {LABELS} share a first token in this tokenizer, "
                "so one forward pass cannot tell them apart."
            )
        self.label_rows = model.get_output_embeddings().weight[ids].detach().clone()
        self.decoder = model.get_decoder()
        self.compute = "fp32"
        # `compute` overrides the manifest's choice (bench/triage.py compares the two)
        if (compute or manifest.get("compute")) == "int8" and device == "cpu":
            with warnings.catch_warnings():
                # torch 2.13 marks its quantized tensor types deprecated; they still run here, and the
                # pinned torch is what this path is tested with
                warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
                torch.ao.quantization.quantize_dynamic(self.decoder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
            self.compute = "int8"
        rendered = self.tokenizer.apply_chat_template(
            classifier_messages(self.instruction, [{"role": "user", "content": _MARK}], self.max_chars),
            tokenize=False,
            add_generation_prompt=True,
        )
        self.head_text, self.tail_text = rendered.split(_MARK)
        self.prefix_ids = self.tokenizer(self.head_text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = self.decoder(input_ids=torch.tensor([self.prefix_ids], device=device), use_cache=True)
        self.prefix = [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _ids(self, messages: Sequence[Mapping]) -> list[int]:
        text = self.head_text + transcript(messages, self.max_chars) + self.tail_text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def scores(self, conversations: Sequence[Sequence[Mapping]]) -> list[dict[str, float]]:
        """Each conversation's probability of each label (softmax over the four label tokens)."""
        import torch

        encoded = [self._ids(messages) for messages in conversations]
        p = len(self.prefix_ids)
        shared = [i for i, ids in enumerate(encoded) if ids[:p] == self.prefix_ids and len(ids) > p]
        alone = [i for i in range(len(encoded)) if i not in set(shared)]  # a tokenizer that merged across the boundary
        results: list[dict | None] = [None] * len(encoded)
        shared.sort(key=lambda i: len(encoded[i]))  # similar lengths together: little padding
        with torch.inference_mode():
            for start in range(0, len(shared), self.batch_size):
                chunk = shared[start : start + self.batch_size]
                self._score([encoded[i][p:] for i in chunk], chunk, results, with_prefix=True)
            for i in alone:
                self._score([encoded[i]], [i], results, with_prefix=False)
        return results

    def _score(self, rows: list[list[int]], where: list[int], results: list, with_prefix: bool) -> None:
        import torch
        from transformers import DynamicCache

        width, pad = max(map(len, rows)), self.tokenizer.pad_token_id
        # right padding: every real token keeps the position it has alone, and pads only follow it
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=self.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=self.device)
        kwargs = {}
        if with_prefix:
            n = len(rows)
            kwargs["past_key_values"] = DynamicCache(
                [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.prefix]
            )
            mask = torch.cat([mask.new_ones(n, len(self.prefix_ids)), mask], dim=1)
        hidden = self.decoder(input_ids=ids, attention_mask=mask, use_cache=with_prefix, **kwargs).last_hidden_state
        last = hidden[torch.arange(len(rows)), torch.tensor([len(row) - 1 for row in rows])]
        probs = torch.softmax(last.float() @ self.label_rows.float().T, dim=-1).tolist()
        for i, row in zip(where, probs):
            results[i] = dict(zip(LABELS, row))

    def decide(self, scores: Mapping[str, float]) -> str:
        return next((label for label in FLAGGED if scores[label] >= self.thresholds[label]), "allow")


class GuardModel:
    """A generative guard model from the Hub (Llama Guard and models with its output format): its chat
    template renders the conversation, it answers "safe" or "unsafe" and a line of category codes, and
    `categories` maps each code to an action (codes not listed get `default`). It has no emergency
    category of its own: emergencies stay with the rules. Meant for a GPU; 1B parameters and up."""

    def __init__(self, name: str, guard: Mapping, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = (
                AutoModelForCausalLM.from_pretrained(
                    name, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32
                )
                .to(device)
                .eval()
            )
        except OSError as err:
            raise TriageModelError(
                f"safety.triage.model={name}: no triage adapter folder by that name, and it "
                f"could not be loaded as a Hub guard model ({str(err).splitlines()[0]}). Give an "
                f"adapter folder, a Hub id that is cached or reachable, or null; {REBUILD}."
            ) from err
        self.device, self.categories = device, {str(k).upper(): str(v) for k, v in guard["categories"].items()}
        self.default, self.max_new_tokens = str(guard["default"]), int(guard["max_new_tokens"])
        self.thresholds: dict[str, float] = {}

    def scores(self, conversations: Sequence[Sequence[Mapping]]) -> list[dict[str, float]]:
        """1.0 for the action the guard's answer maps to, 0.0 for the others."""
        import torch

        results = []
        for messages in conversations:
            chat = [
                {"role": m["role"], "content": m["content"]} for m in messages if m["role"] in ("user", "assistant")
            ]
            ids = self.tokenizer.apply_chat_template(
                chat, return_tensors="pt", add_generation_prompt=True, return_dict=True
            ).to(self.device)
            with torch.inference_mode():
                out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False)
            action = self.action_of(
                self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            )
            results.append({label: float(label == action) for label in LABELS})
        return results

    def action_of(self, answer: str) -> str:
        lines = answer.strip().lower().splitlines()
        if not lines or lines[0].strip() != "unsafe":
            return "allow"
        codes = re.findall(r"s\d+", " ".join(lines[1:]))
        actions = {self.categories.get(code.upper(), self.default) for code in codes} or {self.default}
        return next((label for label in LABELS if label in actions), "allow")

    def decide(self, scores: Mapping[str, float]) -> str:
        return max(LABELS, key=lambda label: scores[label])


def check(spec: str | None) -> None:
    """Refuse a missing or damaged triage adapter before anything loads or is written."""
    folder = resolve_spec(str(spec)) if spec else None
    if folder is not None:
        read_manifest(folder)


def load(
    spec: str | None, cache_dir: str, device: str = "cpu", guard: Mapping | None = None, batch_size: int = 16
) -> TriageModel | GuardModel | None:
    """The model `safety.triage.model` names: a triage adapter folder, a Hub guard model, or None."""
    if not spec:
        return None
    folder = resolve_spec(str(spec))
    if folder is not None:
        return TriageModel(folder, cache_dir, device, batch_size)
    if guard is None:
        raise TriageModelError(f"safety.triage.model={spec} is not a folder: {REBUILD}.")
    return GuardModel(str(spec), guard, device)
