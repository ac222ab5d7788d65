"""Where an adapter comes from: a training run's folder or an MLflow run, with the settings it was trained with.

A run's resolved config names the base model, safety settings and seed; `use_training_config`
brings them back so the adapter meets the model it was trained on. `load_adapter_model` refuses
any other base model before the weights load.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from medlora.config import MedloraError, require
from medlora.files import save_folder
from medlora.model import load_model, load_tokenizer, resolve_checkpoint

RUN_PREFIX = "runs:/"
# what an adapter brings back from its training run; seed too, because it builds tiny_random's weights
BROUGHT_BACK = ("model", "safety", "seed")


@dataclass
class Source:
    adapter_dir: Path
    run_id: str | None = None  # the MLflow training run, when the adapter came from one
    trained: DictConfig | None = None  # that run's resolved config, where it was found


def find_source(cfg: DictConfig) -> Source:
    spec, run_id = cfg.adapter, cfg.run_id
    require(not (spec and run_id), "give the adapter once: adapter=<folder or runs:/<id>> or run_id=<id>, not both.")
    require(
        bool(spec or run_id),
        "no adapter given: pass adapter=outputs/runs/<time>/adapter, "
        "adapter=runs:/<mlflow run id> or run_id=<mlflow run id>.",
    )
    if run_id is not None or str(spec).startswith(RUN_PREFIX):
        require(
            isinstance(run_id or spec, str),
            f"run_id={run_id} was read as a number: quote it, e.g. run_id=\"'{run_id}'\".",
        )
        run_id, _, artifact = (run_id or spec[len(RUN_PREFIX) :]).partition("/")
        require(
            artifact.strip("/") in ("", "adapter"),
            f"adapter={spec}: give runs:/<run id>; the adapter is the run's `adapter` artifact.",
        )
        return _from_run(cfg, run_id)
    folder = Path(str(spec)).expanduser()
    require(
        folder.is_dir(),
        f"adapter={spec} does not exist: give a training run's adapter folder, e.g. "
        "outputs/runs/<time>/adapter, or adapter=runs:/<mlflow run id>.",
    )
    require(
        (folder / "adapter_config.json").is_file(),
        f"adapter={spec} is not an adapter folder (no adapter_config.json): give the `adapter` folder "
        "inside a training run's folder.",
    )
    # train.py writes the resolved config next to the adapter: it names the model it was trained on
    beside = folder.resolve().parent / "config_resolved.yaml"
    return Source(folder.resolve(), trained=OmegaConf.load(beside) if beside.is_file() else None)


def _from_run(cfg: DictConfig, run_id: str) -> Source:
    tracking = cfg.tracking
    require(
        bool(tracking.enabled and tracking.uri),
        f"run {run_id} is an MLflow run, but tracking is off: "
        "use tracking=mlflow (the default store) or set tracking.uri to the store that holds the run.",
    )
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking.uri)
    try:
        client.get_run(run_id)
        names = {a.path for a in client.list_artifacts(run_id)}
    except MlflowException as err:
        raise MedloraError(
            f"no MLflow run {run_id} in tracking.uri={tracking.uri} "
            f"({str(err).splitlines()[0]}). Check the id: the training log prints it, and "
            "`make ui` lists every run."
        ) from err
    require(
        "adapter" in names,
        f"MLflow run {run_id} has no `adapter` artifact (was it trained with "
        "tracking.log_adapter=false?): give its folder instead, "
        "adapter=outputs/runs/<time>/adapter.",
    )
    # run artifacts never change, so one download per run is enough
    target = Path(cfg.paths.cache_dir) / "runs" / run_id
    if not (target / "adapter" / "adapter_config.json").is_file():
        wanted = ["adapter", *(["config_resolved.yaml"] if "config_resolved.yaml" in names else [])]
        save_folder(
            target,
            lambda folder: _download(tracking.uri, run_id, wanted, folder),
            cache_entry="adapter/adapter_config.json",
        )
    trained = target / "config_resolved.yaml"
    return Source(target / "adapter", run_id, OmegaConf.load(trained) if trained.is_file() else None)


def _download(uri: str, run_id: str, artifacts: list[str], folder: Path) -> None:
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a few local files: no bar needed
    for artifact in artifacts:
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=str(folder), tracking_uri=uri
        )


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
            cfg[section] = (
                OmegaConf.merge(OmegaConf.to_container(mine), trained[section])
                if isinstance(mine, DictConfig)
                else trained[section]
            )
            for key in sorted(k for k in given if k.startswith(f"{section}.")):
                OmegaConf.update(cfg, key, OmegaConf.select(original, key), force_add=True)
            brought.append(section)
    return brought


def load_adapter_model(
    cfg: DictConfig, source: Source, device: str, precision: str, model_cfg: DictConfig | None = None
):
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
        raise MedloraError(
            f"the adapter {source.adapter_dir} does not fit model.base_model={model_cfg.base_model} "
            f"({str(err).splitlines()[0][:300]}). Use the model it was trained on: "
            "adapter=runs:/<run id> brings it back."
        ) from err
    model.eval()
    return model, tokenizer, base_path


def check_base_model(adapter_dir: Path, base_path: str, model_cfg: DictConfig) -> None:
    """Refuse an adapter trained on another base model: its weights would load and produce nonsense."""
    from peft import PeftConfig

    recorded = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not recorded or _same_model(recorded, str(base_path)):
        return
    raise MedloraError(
        f"the adapter {adapter_dir} was trained on base model {recorded}, but model.base_model="
        f"{model_cfg.base_model} loads {base_path}. Use the model it was trained on: "
        "adapter=runs:/<run id> or a training run's adapter folder brings it back; or set model=... "
        "to match."
    )


def _same_model(recorded: str, loaded: str) -> bool:
    if recorded == loaded:
        return True
    if not Path(loaded).is_dir():  # a Hub id: only the same id is the same model
        return False
    # a local checkpoint: the same folder named another way (relative, moved cache), or a
    # download of the recorded Hub id; medlora's cache folders are named by a hash of the weights
    return Path(recorded).resolve().name == Path(loaded).resolve().name
