"""One typed, validated config tree for every stage of the system.

A run is described by a :class:`Config` built from a YAML preset (``configs/*.yaml``) plus
``--set dotted.name=value`` overrides. Everything is checked up front - unknown keys, wrong types,
values out of range - so a typo fails in milliseconds on the driver, not an hour into a cluster run.

Field constraints live next to the field (``choices``, ``ge``/``gt``/``le``) so the rules are read in
one place and the error message can say what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("sample", "cifar10", "imagenet")


class ConfigError(ValueError):
    """An invalid configuration: the message names the field, the value and what is allowed."""


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that also reads ``1e-3`` as a number. PyYAML follows YAML 1.1, where a float
    needs a dot (``1.0e-3``) and ``1e-3`` is a string; scientific notation is how people write learning
    rates and weight decays, and YAML 1.2 (and JSON) read it as a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text (safe: plain data only), reading scientific notation such as ``1e-3`` as numbers.
    Every config, override and search space is read with this."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _f(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field carrying its help text and validation rules."""
    meta = {"help": help, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    backbone: str = _f("resnet50", "encoder backbone", choices=("resnet18", "resnet34", "resnet50", "small"))
    cifar_stem: bool = _f(False, "3x3 stride-1 conv1 and no max-pool (the paper's CIFAR variant)")
    small_width: int = _f(32, "base channel width of the 'small' backbone", ge=4)
    zero_init_residual: bool = _f(True, "zero-init the last BN gamma of each residual block")
    proj_layers: int = _f(3, "layers of the projection MLP (paper: 3 on ImageNet, 2 on CIFAR)", ge=1)
    proj_hidden_dim: int = _f(0, "hidden width of the projector; 0 = same as dim", ge=0)
    dim: int = _f(2048, "output width d of projector and predictor", ge=2)
    pred_dim: int = _f(512, "predictor bottleneck width (paper: d/4)", ge=1)
    bn: str = _f("default", "BN placement in the MLPs (paper's Table 3)",
                 choices=("none", "hidden", "default", "pred_output"))
    predictor: str = _f("learned", "predictor h: learned, none (identity), fixed (frozen at init)",
                        choices=("learned", "none", "fixed"))


@dataclass
class LossConfig:
    stop_gradient: bool = _f(True, "detach the target branch (what prevents collapse)")
    similarity: str = _f("cosine", "D(p, z): negative cosine or cross-entropy", choices=("cosine", "cross_entropy"))
    symmetric: bool = _f(True, "L = D(p1,z2)/2 + D(p2,z1)/2; false keeps D(p1,z2) only")
    target_refresh_steps: int = _f(1, "k-step variant: refresh the targets every k steps (1 = SimSiam)", ge=1)


@dataclass
class OptimConfig:
    base_lr: float = _f(0.05, "lr = base_lr x GLOBAL batch / 256", gt=0.0)
    batch_size: int = _f(512, "GLOBAL batch over all workers and nodes", ge=2)
    weight_decay: float = _f(1e-4, "SGD weight decay on all parameters", ge=0.0)
    momentum: float = _f(0.9, "SGD momentum", ge=0.0, lt=1.0)
    fix_pred_lr: bool = _f(True, "keep the predictor's lr constant (not cosine-decayed)")
    warmup_epochs: float = _f(0.0, "linear warm-up (paper: 10 epochs for batch >= 1024)", ge=0.0)


@dataclass
class DataConfig:
    path: str = _f("builtin:digits", "training shards: a directory or URI of Parquet shards, or a built-in set: "
                                     "builtin:digits, builtin:shapes")
    eval_path: str = _f("", "held-out shards for kNN/linear test; empty = the builtin's test split")
    image_size: int = _f(224, "crop size fed to the network", ge=8)
    eval_resize: float = _f(256 / 224, "eval: resize the short side to image_size x this, then centre-crop", ge=1.0)
    crop_min_scale: float = _f(0.2, "RandomResizedCrop lower scale bound", gt=0.0, le=1.0)
    color_jitter: float = _f(0.4, "ColorJitter strength for brightness/contrast/saturation (hue = s/4)", ge=0.0)
    jitter_prob: float = _f(0.8, "probability of colour jitter", ge=0.0, le=1.0)
    grayscale_prob: float = _f(0.2, "probability of grayscale", ge=0.0, le=1.0)
    blur: str = _f("auto", "Gaussian blur: auto (off below 64 px), on, off", choices=("auto", "on", "off"))
    mean: list = _f([0.485, 0.456, 0.406], "normalisation mean (RGB)")
    std: list = _f([0.229, 0.224, 0.225], "normalisation std (RGB)")
    on_bad_image: str = _f("error", "corrupt/oversized image: error, or skip (counted)", choices=("error", "skip"))
    max_pixels: int = _f(89_478_485, "refuse images with more pixels (decompression bombs)", ge=1)
    shuffle_buffer: int = _f(1024, "rows in the seeded local shuffle buffer on each worker (0 = off)", ge=0)
    prefetch_batches: int = _f(2, "batches each train worker prefetches ahead of the step (Ray Data's "
                                  "iter_torch_batches prefetch_batches; benchmarks/gpu_e2e.py measures depths)", ge=0)
    # cpu stays the default until the device path has been measured on CUDA (benchmarks/gpu_e2e.py).
    decode: str = _f("cpu", "where training images are decoded and cropped: cpu (in Ray Data tasks, PIL), gpu "
                            "(JPEG bytes + crop boxes travel; the train worker decodes a batch on its device with "
                            "torchvision's decode_jpeg, nvjpeg on CUDA, and crops there; JPEG data only), auto "
                            "(gpu when train.use_gpu and the shards hold JPEG, else cpu). gpu on CPU-only workers "
                            "decodes there, much slower than cpu: for tests",
                     choices=("auto", "cpu", "gpu"))
    data_cpus: float = _f(0.0, "CPU cap for Ray Data tasks (0 = Ray's default)", ge=0.0)
    cache_dir: str = _f("", "where builtin sets are converted; empty = ~/.cache/simsiam")


@dataclass
class CollapseGuardConfig:
    enabled: bool = _f(True, "stop a run whose representation has collapsed")
    std_ratio: float = _f(0.5, "collapsed when std(z/|z|) < std_ratio / sqrt(d)", ge=0.0, le=1.0)
    rank_ratio: float = _f(0.2, "collapsed when effective rank < rank_ratio x min(rank_rows, batch, d)",
                           ge=0.0, le=1.0)
    # A healthy projection's rank grows with the rows it is measured on and saturates well under d (the
    # sample's default: 28 over 64 rows, 88 over 512, 101 over 4096), so a threshold scaled with the batch
    # judged healthy large-batch runs collapsed. A fixed row count keeps one threshold right at every batch.
    rank_rows: int = _f(64, "the effective rank is measured on the first rank_rows projections of each "
                            "worker's batch (all of it when smaller)", ge=2)
    window_steps: int = _f(50, "consecutive collapsed steps before the run is stopped", ge=1)


@dataclass
class TrainConfig:
    epochs: int = _f(100, "pretraining epochs", ge=1)
    num_workers: int = _f(1, "train workers (max of the elastic range)", ge=1)
    min_workers: int = _f(0, "elastic lower bound; 0 = fixed size", ge=0)
    use_gpu: bool = _f(False, "one GPU per worker; NCCL, bf16 autocast, channels_last")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per train worker", gt=0.0)
    placement_strategy: str = _f("PACK", "worker placement: PACK (fewest nodes) or SPREAD (one per node)",
                                 choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    seed: int = _f(0, "seed for weights, shuffling and augmentation")
    amp: bool = _f(True, "bf16 autocast on GPU")
    channels_last: bool = _f(True, "channels_last memory format on GPU")
    sync_bn: bool = _f(True, "synchronised BN across workers")
    checkpoint_every: int = _f(1, "epochs between checkpoints", ge=1)
    keep_checkpoints: int = _f(2, "checkpoints kept (newest)", ge=1)
    max_failures: int = _f(3, "worker/node failures tolerated (restart from the last checkpoint)", ge=-1)
    knn_every: int = _f(1, "epochs between kNN monitor runs (0 = never)", ge=0)
    knn_k: int = _f(200, "kNN neighbours", ge=1)
    knn_t: float = _f(0.1, "kNN temperature", gt=0.0)
    log_every: int = _f(10, "steps between logged scalars", ge=1)
    init_checkpoint: str = _f("", "warm start: a pretraining checkpoint dir whose weights initialise the model")
    max_steps_per_epoch: int = _f(0, "cap steps per epoch (0 = full epoch); for smoke tests", ge=0)
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)


@dataclass
class LinearEvalConfig:
    protocol: str = _f("cached", "cached features (fast, for searches) or the paper's full protocol",
                       choices=("cached", "full"))
    epochs: int = _f(90, "linear classifier epochs", ge=1)
    batch_size: int = _f(4096, "linear batch", ge=1)
    base_lr: float = _f(0.1, "lr = base_lr x batch / 256 (reference code value)", gt=0.0)
    optimizer: str = _f("lars", "LARS (paper) or plain SGD", choices=("lars", "sgd"))
    weight_decay: float = _f(0.0, "weight decay", ge=0.0)
    momentum: float = _f(0.9, "momentum", ge=0.0, lt=1.0)
    num_workers: int = _f(1, "linear-eval workers", ge=1)
    standardize: bool = _f(True, "cached protocol: standardise every feature with the fit set's mean and std "
                                 "before the linear layer (as MAE's BatchNorm-without-affine probe), so the score "
                                 "does not depend on the feature scale; the full protocol never does")


@dataclass
class EvalConfig:
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)
    enabled: bool = _f(True, "run linear evaluation after pretraining")
    baselines: bool = _f(True, "cached protocol: also score the same architecture at random init and the raw "
                               "eval pixels (flattened) under the same protocol and data (results.json "
                               "baselines, ssl_gain); turn off for ImageNet-scale data, where raw pixels are "
                               "H x W x 3 features per image")


@dataclass
class RunConfig:
    name: str = _f("simsiam", "run name; rerunning the same name resumes it")
    storage_path: str = _f("", "checkpoints and logs: local dir or s3://, gs:// URI; empty = <out-dir>/ray")


@dataclass
class RetrainConfig:
    margin: float = _f(0.5, "promote only when the new model's linear top-1 >= the promoted one's + margin "
                            "(percentage points; negative accepts a slightly worse model)")
    warm_start: bool = _f(True, "start from the promoted model's weights; false = from train.init_checkpoint, "
                                "else from scratch")
    train_on: str = _f("all", "shards to pretrain on: every shard under data.path, or only the new ones",
                       choices=("all", "new"))
    eval_train_path: str = _f("", "fixed labelled set the linear classifier is fitted on (data.eval_path is "
                                  "the held-out set); empty = data.path's built-in train split")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def per_worker_batch(self) -> int:
        """The batch each worker steps on (and measures the collapse metrics on) at ``train.num_workers``."""
        return self.optim.batch_size // self.train.num_workers

    def replace(self, overrides: Mapping[str, Any]) -> Config:
        """A validated copy with dotted-name overrides applied (values already typed or YAML strings)."""
        d = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(d, key, value)
        return from_dict(d)

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------- validation


def check_value(path: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` checked as the field ``path`` of Python type ``tp`` with the rules ``meta`` (a field's
    metadata: ``choices``, ``ge``/``gt``/``le``/``lt``) and normalised (1e6 -> 1000000 for an int, an int ->
    float for a float); :class:`ConfigError` naming ``path`` otherwise. Rules spanning fields are
    :func:`validate`'s."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, float) and value.is_integer():  # 1e6 reads as a float
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    elif tp is list:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"{path}: expected a list of numbers, got {value!r}")
        value = [float(v) for v in value]
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    for rule, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                           ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if rule in meta and not ok(value, meta[rule]):
            raise ConfigError(f"{path}: {value!r} is out of range; must be {word} {meta[rule]}")
    return value


def _validate_node(node: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        path = f"{prefix}{f.name}"
        value = getattr(node, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"{path}: expected a section, got {value!r}")
            _validate_node(value, path + ".")
        else:
            object.__setattr__(node, f.name, check_value(path, value, tp, f.metadata))


def validate(cfg: Config) -> Config:
    """Check every field and the rules that span fields; raise :class:`ConfigError` naming the field."""
    for f in dataclasses.fields(cfg):
        _validate_node(getattr(cfg, f.name), f.name + ".")
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
        raise ConfigError(f"data.mean/data.std: need 3 values each and std > 0, got {d.mean} / {d.std}")
    if t.min_workers > t.num_workers:
        raise ConfigError(f"train.min_workers: {t.min_workers} is out of range; must be <= train.num_workers "
                          f"({t.num_workers})")
    if o.batch_size % t.num_workers:
        raise ConfigError(f"optim.batch_size: {o.batch_size} must be divisible by train.num_workers "
                          f"({t.num_workers}) - it is the GLOBAL batch, split evenly over workers")
    if o.batch_size // max(t.num_workers, 1) < 2 and m.bn != "none":
        raise ConfigError(f"optim.batch_size: {o.batch_size} leaves fewer than 2 images per worker; BN needs 2")
    if m.predictor == "none" and m.bn == "pred_output":
        raise ConfigError("model.bn: 'pred_output' needs a predictor, but model.predictor is 'none'")
    return cfg


# --------------------------------------------------------------------------- loading


def known_keys(tp: type | None = None, prefix: str = "") -> list[str]:
    """Every field's dotted name under the config section ``tp`` (default: the whole :class:`Config`),
    each prefixed with ``prefix``; for "did you mean" hints and checks that a name exists."""
    tp = Config if tp is None else tp
    out = []
    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        if dataclasses.is_dataclass(hints[f.name]):
            out += known_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _build(tp: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(tp)
    names = {f.name for f in dataclasses.fields(tp)}
    for key in data:
        if key not in names:
            import difflib
            close = difflib.get_close_matches(f"{prefix}{key}", known_keys(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(names))}"
            raise ConfigError(f"{prefix}{key}: unknown config key{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        sub = hints[name]
        kwargs[name] = _build(sub, data[name], f"{prefix}{name}.") if dataclasses.is_dataclass(sub) else data[name]
    obj = tp.__new__(tp)
    # Build nested sections without running Config.__post_init__ until the whole tree exists.
    for f in dataclasses.fields(tp):
        if f.name in kwargs:
            val = kwargs[f.name]
        elif f.default is not dataclasses.MISSING:
            val = f.default
        else:
            val = f.default_factory()  # type: ignore[misc]
        object.__setattr__(obj, f.name, val)
    return obj


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) nested mapping."""
    cfg = _build(Config, data or {}, "")
    return validate(cfg)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: unknown config section in override {key!r}")
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        import difflib
        close = difflib.get_close_matches(key, known_keys(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{key}: unknown config key in override{hint}")
    if isinstance(value, str) and not isinstance(node[parts[-1]], str):
        try:
            value = yaml_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {value!r}: {e}") from None
    node[parts[-1]] = value


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """Parse ``["a.b=1", ...]`` into ``{"a.b": "1"}``; values are typed later against the field."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.name=value, e.g. optim.base_lr=0.05")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def resolve_preset(name_or_path: str | os.PathLike | None) -> Path:
    """A preset name (sample, cifar10, imagenet) or a YAML path -> the YAML file path."""
    if name_or_path is None:
        name_or_path = "sample"
    s = str(name_or_path)
    if s in PRESETS or (not s.endswith((".yaml", ".yml")) and (CONFIG_DIR / f"{s}.yaml").exists()):
        return CONFIG_DIR / f"{s}.yaml"
    p = Path(s)
    if not p.exists():
        raise ConfigError(f"config {s!r}: no such file, and not a preset ({', '.join(PRESETS)})")
    return p


def load(name_or_path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """Load a preset or YAML file, apply overrides (a mapping or ``k=v`` strings), validate."""
    path = resolve_preset(name_or_path)
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    try:
        base = from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return base.replace(overrides) if overrides else base


def dump(cfg: Config, path: str | os.PathLike) -> None:
    """Write the full config as YAML (atomically), loadable with :func:`load`."""
    from simsiam.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe(cfg: Config | None = None) -> list[tuple[str, Any, str]]:
    """(dotted name, value, help) for every field: ``cfg``'s values, or the library defaults - used by
    ``simsiam config --list``."""
    rows = []

    def walk(tp: type, obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], getattr(obj, f.name), f"{prefix}{f.name}.")
            else:
                extra = f" [{'|'.join(map(str, f.metadata['choices']))}]" if "choices" in f.metadata else ""
                rows.append((prefix + f.name, getattr(obj, f.name), f.metadata.get("help", "") + extra))

    walk(Config, cfg if cfg is not None else Config(), "")
    return rows
