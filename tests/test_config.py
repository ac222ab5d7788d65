"""Every config group composes, validates and instantiates (Hydra's compose API, no subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from medlora import allocator, data
from medlora import config as medconfig
from medlora.adapters import add_adapter
from medlora.config import groups as schema_groups
from medlora.config.schema import build, settings
from medlora.files import save_folder
from medlora.model import load_model, quantization_config, resolve_checkpoint

from helpers import MEDQUAD, ROOT, conversation, write_jsonl

GROUPS = {
    name: sorted(p.stem for p in (ROOT / "conf" / name).glob("*.yaml"))
    for name in ("model", "lora", "training", "data", "safety", "tracking", "paths", "hydra", "experiment", "debug")
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def compose_infer(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="infer", overrides=list(overrides))


def test_defaults_follow_the_design():
    cfg = _compose()
    assert (cfg.device, cfg.precision, cfg.model.quantization) == ("auto", "auto", "none")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (32, 64, 0.1, "all-linear")
    assert cfg.training.learning_rate == 1e-4
    assert cfg.model.base_model.endswith(".gguf") and cfg.tracking.uri.startswith("sqlite:///")
    medconfig.validate(cfg)


@pytest.mark.parametrize(
    "group, option", [(g, o) for g, options in GROUPS.items() for o in options if g not in ("paths", "hydra")]
)
def test_every_option_composes_and_validates(tmp_path, group, option):
    extra = []
    if group in ("data", "experiment") and option in ("jsonl", "medquad_smollm2"):
        path = write_jsonl(tmp_path / "d.jsonl", [conversation("q", "a")])
        extra = [f"data.train_file={path}", f"data.eval_file={path}"]
    cfg = _compose(f"{group}={option}", *extra)
    if group == "model" and cfg.model.quantization != "none":
        pytest.importorskip("bitsandbytes")
    medconfig.validate(cfg)


def test_each_config_group_folder_exists():
    for name in ("model", "lora", "training", "data", "safety", "tracking", "paths", "hydra", "experiment", "debug"):
        assert GROUPS[name], f"conf/{name}/ is empty"


@pytest.mark.parametrize(
    "lora_overrides",
    [
        [],
        ["lora.use_dora=true"],
        ["lora.use_rslora=true"],
        ["lora.target_modules=[q_proj,v_proj]", "lora.bias=lora_only"],
    ],
)
def test_lora_options_instantiate(lora_overrides):
    cfg = _compose("model=tiny_random", *lora_overrides)
    path, _ = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)
    model, trainable, total = add_adapter(load_model(path, cfg.model, "fp32", "cpu"), cfg.lora, False)
    assert 0 < trainable < total
    peft_cfg = model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.use_dora, peft_cfg.use_rslora) == (
        cfg.lora.rank,
        cfg.lora.alpha,
        cfg.lora.use_dora,
        cfg.lora.use_rslora,
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.endswith(".bias") for n in names)


def test_tiny_random_model_instantiates_deterministically():
    cfg = _compose("model=tiny_random")
    path, tokenizer_path = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)
    model = load_model(path, cfg.model, "fp32", "cpu")
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 49152
    assert resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)[0] == path  # cached, not rebuilt


def test_embedded_smollm2_instantiates_from_its_cache():
    cfg = _compose()
    path, tokenizer_path = resolve_checkpoint(cfg.model, cfg.paths.cache_dir, cfg.seed)
    assert Path(path, "model.safetensors").is_file() and tokenizer_path == path
    model = load_model(path, cfg.model, "bf16", "cpu")
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_a_cache_entry_made_twice_keeps_the_first_and_leaves_nothing_behind(tmp_path):
    """Parallel jobs dequantizing the embedded model at once: the slower one uses the faster one's copy."""

    def write(text: str):
        return lambda folder: (folder / "config.json").write_text(text)

    entry = tmp_path / "models" / "m"
    assert save_folder(entry, write("first"), cache_entry="config.json") == entry
    assert save_folder(entry, write("second"), cache_entry="config.json") == entry
    assert (entry / "config.json").read_text() == "first"
    with pytest.raises(OSError):  # not a cache entry: an existing folder is never replaced
        save_folder(entry, write("third"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]


def test_phi4_mini_is_4bit_qlora_and_reports_when_the_hub_is_out_of_reach():
    cfg = _compose("model=phi4_mini")
    assert cfg.model.base_model == "microsoft/Phi-4-mini-instruct"
    quant = quantization_config(cfg.model, torch.bfloat16)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    # tests run offline (HF_HUB_OFFLINE=1): loading must fail with our message, not a stack of retries
    with pytest.raises(medconfig.MedloraError, match="microsoft/Phi-4-mini-instruct"):
        load_model(cfg.model.base_model, cfg.model, "bf16", "cpu")


@pytest.mark.parametrize("option", GROUPS["data"])
def test_data_options_load(tmp_path, option):
    path = write_jsonl(tmp_path / "d.jsonl", [conversation("q", "a")] * 3)
    cfg = _compose(
        f"data={option}",
        *([f"data.train_file={path}"] if option == "jsonl" else []),
        *([f"data.build.out_dir={tmp_path}/built"] if option == "safety_triage" else []),
    )
    data.build_data(cfg.data)  # a data group with a `build` writes its files first, as train.py does
    train = data.load_conversations(cfg.data.train_file)
    assert train and all(m[-1]["role"] == "assistant" for m in train)
    if option == "sample_medical":
        assert len(train) >= 300 and len(data.load_conversations(cfg.data.eval_file)) >= 30


def test_medquad_experiment_points_at_shared_data():
    if not MEDQUAD.is_dir():
        pytest.skip("../shared/data/medquad is not beside this checkout")
    cfg = _compose("experiment=medquad_smollm2")
    medconfig.validate(cfg)
    assert OmegaConf.select(cfg, "data.train_file").endswith("medquad/train.jsonl")


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rank=0", "lora.rank=0 is invalid"),
        ("lora.rank=2.5", "lora.rank=2.5 is invalid"),
        ("lora.dropout=1.5", "lora.dropout=1.5 is invalid"),
        ("training.learning_rate=-1e-4", "training.learning_rate="),
        ("training.batch_size=0", "training.batch_size=0 is invalid"),
        ("precision=fp8", "precision='fp8' is invalid"),
        ("training.lr_scheduler=warp", "is not a transformers scheduler"),
        ("training.overlong=cut", "truncate or drop"),
        ("training.max_steps=0", "both 0"),
        ("training.allocator=glibc", "training.allocator='glibc' is invalid"),
        ("tracking.retry_max_wait=-3", "tracking.retry_max_wait=-3 is invalid: it must be a number > 0"),
        ("tracking.enabled=maybe", "tracking.enabled='maybe' is invalid: use true or false."),
        ("training.resume=sometimes", "training.resume='sometimes' is invalid: use one of auto, never."),
        ("training.shared_prefix_scope=batch", "training.shared_prefix_scope='batch' is invalid: use step or row"),
        (
            "training.optimizer._target_=torch.optim.NoSuchOptimizer",
            "training.optimizer._target_=torch.optim.NoSuchOptimizer cannot be imported",
        ),
        (
            "~training.optimizer._target_",
            "training.optimizer has no _target_: give one such as training.optimizer._target_=torch.optim.AdamW",
        ),
        ("training.scheduler._partial_=false", "training.scheduler._partial_ must be true"),
        ("optimized_metric=accuracy", "optimized_metric='accuracy' is not a metric of this run: use one of eval_loss"),
        (
            "model.quantization=4bit model.quantization_config.bnb_4bit._partial_=false",
            "model.quantization_config.bnb_4bit._partial_ must be true",
        ),
    ],
)
def test_bad_values_are_named(override, message):
    cfg = _compose(*override.split(), *(["training.num_epochs=0"] if override == "training.max_steps=0" else []))
    with pytest.raises(medconfig.MedloraError, match=message.replace("(", r"\(")):
        medconfig.validate(cfg)


def test_a_missing_triage_data_folder_is_named():
    # data=safety_triage builds its files when the run starts: its source folder is what must exist
    cfg = _compose("data=safety_triage", "data.build.own_dir=/no/such/folder")
    with pytest.raises(medconfig.MedloraError, match="data.build.own_dir=/no/such/folder does not exist"):
        medconfig.validate(cfg)


def test_a_bad_random_init_dtype_is_named():
    cfg = _compose("model=phi4_mini_random", "model.random_init.dtype=float8")
    with pytest.raises(
        medconfig.MedloraError,
        match="model.random_init.dtype='float8' is invalid: the random weights "
        "are saved in one of float32, bfloat16, float16",
    ):
        medconfig.validate(cfg)


def test_a_named_allocator_that_is_not_installed_names_the_fix(monkeypatch):
    monkeypatch.setattr(allocator, "library", lambda name: None)
    with pytest.raises(
        medconfig.MedloraError,
        match="training.allocator=tcmalloc: its library is not installed here. "
        "Install the system package libtcmalloc-minimal4",
    ):
        medconfig.validate(_compose("training.allocator=tcmalloc"))
    # auto falls back to the system's: a speed option never stops a run
    assert allocator.choose("auto") == ("system", None)


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_cpus_native_bf16(monkeypatch, native_bf16, expected):
    from medlora.fast import compat

    monkeypatch.setattr(compat, "mkldnn_bf16_supported", lambda: native_bf16)
    assert medconfig.resolve_precision("auto", "cpu") == expected
    assert medconfig.resolve_precision("fp32", "cpu") == "fp32"  # a named precision is never changed
    assert medconfig.resolve_device("auto") in ("cpu", "cuda")


def test_a_misspelt_key_stops_composition_and_a_wrong_type_reaches_its_check():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="rnak"):
        _compose("lora.rnak=16")
    # the schema types its fields Any in the store: a float rank is composed, then named by its check
    with pytest.raises(medconfig.MedloraError, match=r"lora.rank='sixteen' is invalid: the LoRA rank must be"):
        medconfig.validate(_compose("lora.rank=sixteen"))


def test_the_default_options_are_the_schemas_defaults():
    cfg = _compose()
    assert build(schema_groups.Lora, cfg.lora) == schema_groups.Lora()
    assert build(schema_groups.Inference, compose_infer().inference) == schema_groups.Inference()
    safety = build(medconfig.GROUPS["safety"], cfg.safety)
    assert safety.triage.guard.categories == {"S11": "crisis", "S6": "allow", "S8": "allow", "S13": "allow"}
    assert safety.phi_redaction.seed == cfg.seed == 42  # ${oc.select:seed,0} resolves in a run


def _set(node: dict, known: dict, prefix: str):
    """The settings an option file sets: dotted keys of the schema, with their values."""
    for key, value in node.items():
        dotted = f"{prefix}.{key}"
        if dotted in known or not isinstance(value, dict):
            yield dotted, value
        else:
            yield from _set(value, known, dotted)


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in medconfig.GROUPS for o in sorted(p.stem for p in (ROOT / "conf" / g).glob("*.yaml"))],
)
def test_an_option_states_only_what_differs_from_the_schema(group, option):
    import yaml

    known = {key: default for key, _, default, _ in settings(medconfig.GROUPS[group])}
    text = yaml.safe_load((ROOT / "conf" / group / f"{option}.yaml").read_text()) or {}
    text.pop("defaults", None)
    stated = dict(_set(text, known, group))
    assert all(key in known for key in stated), f"not settings of the {group} schema: {set(stated) - set(known)}"
    restated = [key for key, value in stated.items() if value == known[key]]
    assert not restated, f"conf/{group}/{option}.yaml restates the schema's defaults: {restated}"
