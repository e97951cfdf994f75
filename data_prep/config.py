"""Typed schema of ``conf/prep.yaml``: the dataclasses define fields and defaults, YAML gives values.

Sources and filters are open sets (registries), so their entries are mappings ``name -> options``
that are checked here against the registered class's own ``Config`` dataclass: a new source or
filter brings its schema with it and this file does not change. Every check runs before any work
and fails with one line naming the field, e.g. ``filters.caption_length: min_words (5) must be <=
max_words (3)``.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from data_prep import PrepError
from data_prep.filters import FILTERS
from data_prep.sources import SOURCES

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the checkout's conf/ (editable install)
CONFIG_NAME = "prep"


class ConfigError(PrepError, ValueError):
    """An invalid config value; the message is one line naming the field and what is allowed."""


class ModelType(str, enum.Enum):
    unigram = "unigram"
    bpe = "bpe"


@dataclass
class TokenizerConfig:
    vocab_size: int = 2000  # a soft limit (hard_vocab_limit=False): small corpora get fewer pieces
    model_type: ModelType = ModelType.unigram
    max_sentences: int = 1_000_000  # distinct training captions it learns from (the first ones in shard order)

    def __post_init__(self) -> None:
        self.model_type = _choice(ModelType, self.model_type, "tokenizer.model_type")
        if self.vocab_size <= 4:  # ids 0..3 are pad/unk/bos/eos
            raise ConfigError(f"tokenizer.vocab_size must be > 4 (ids 0-3 are special), got {self.vocab_size}")


@dataclass
class WorkersConfig:
    """How the work is split: ``processes`` on this machine, and this machine's share of a multi-machine
    build (``rank`` of ``world``; None = from torchrun's RANK/WORLD_SIZE or a Slurm array's
    SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else 0 of 1)."""

    processes: int = 0  # 0 = one per CPU core
    rank: Optional[int] = None
    world: Optional[int] = None
    wait_timeout: float = 86_400.0  # seconds the merging worker (rank 0) waits for the others' units

    def __post_init__(self) -> None:
        if self.processes < 0:
            raise ConfigError(f"workers.processes must be >= 0 (0 = one per core), got {self.processes}")
        if self.world is not None and self.world < 1:
            raise ConfigError(f"workers.world must be >= 1, got {self.world}")
        if self.rank is not None and not 0 <= self.rank < (self.world or 1):
            raise ConfigError(f"workers.rank must be in [0, workers.world), got rank={self.rank} world={self.world}")


@dataclass
class PrepConfig:
    out_dir: str = "runs/demo/data"
    seed: int = 0  # mixes into the train/heldout split hash, the unit order and tokenizer training
    samples_per_shard: int = 5000
    unit_size: int = 5000  # input items per unit of work (what one worker process takes at a time)
    batch_size: int = 256  # samples fetched and measured together inside a unit
    retry_failed: bool = False  # re-fetch only the samples whose download failed transiently
    # name -> options of that source's Config (``type:`` picks the source, default: the name itself)
    sources: dict[str, Any] = field(default_factory=lambda: {name: {} for name in ("fashion_mnist", "tuxpaint")})
    # name -> options of that filter's Config, run in this order
    filters: dict[str, Any] = field(default_factory=dict)
    download: Any = None  # data_prep.download.DownloadConfig
    resize: Any = None  # data_prep.resize.ResizeConfig
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def __post_init__(self) -> None:
        from data_prep.download import DownloadConfig  # imported here: they import nothing of config
        from data_prep.resize import ResizeConfig

        if not str(self.out_dir).strip():
            raise ConfigError("out_dir must not be empty")
        for name in ("samples_per_shard", "unit_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.sources:
            raise ConfigError(f"sources is empty: enable at least one of {', '.join(SOURCES)}")
        if isinstance(self.tokenizer, dict):
            self.tokenizer = TokenizerConfig(**self.tokenizer)
        if isinstance(self.workers, dict):
            self.workers = WorkersConfig(**self.workers)
        self.download = parse_options(DownloadConfig, self.download, "download")
        self.resize = parse_options(ResizeConfig, self.resize, "resize")
        self.sources = _entries("sources", self.sources, {k: v.Config for k, v in SOURCES.items()}, typed=True)
        self.filters = _entries("filters", self.filters, {k: v.Config for k, v in FILTERS.items()})


def _choice(enum_cls: type[enum.Enum], value: Any, where: str) -> enum.Enum:
    try:
        return enum_cls(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ConfigError(f"{where}: {value!r} is not one of {allowed}") from None


def _entries(group: str, entries: dict[str, Any], schemas: dict[str, type], typed: bool = False) -> dict[str, Any]:
    """Check each ``name: options`` of ``group`` against the registered schema, keeping the order.
    With ``typed``, an entry's ``type`` option names the schema (several entries of one type)."""
    out = {}
    for name, options in (entries or {}).items():
        kind = name
        if typed:
            kind = getattr(options, "type", None) if not isinstance(options, dict) else options.get("type")
            kind = kind or name
        if kind not in schemas:
            what = f"type {kind!r}" if kind != name else f"{group[:-1]}"
            raise ConfigError(f"{group}.{name}: unknown {what}; allowed: {', '.join(schemas)}")
        out[name] = parse_options(schemas[kind], options, f"{group}.{name}")
        if typed:
            out[name].type = kind
    return out


def parse_options(schema: type, options: Any, where: str) -> Any:
    """``options`` (mapping, None or an instance) as a validated ``schema`` dataclass instance.
    OmegaConf checks names and types; the dataclass's ``__post_init__`` checks the values."""
    if isinstance(options, schema):
        return options
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), options or {})
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        allowed = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ConfigError(f"{where}.{e.key}: unknown option; allowed: {allowed}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e, prefix=where)) from None
    except ValueError as e:  # from the schema's __post_init__
        raise ConfigError(f"{where}: {e}") from None


def _omegaconf_message(e: OmegaConfBaseException, prefix: str = "") -> str:
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    key = ".".join(k for k in (prefix, getattr(e, "full_key", None) or "") if k)
    return f"{key}: {msg}" if key else msg


def to_dict(cfg: Any) -> Any:
    """Plain JSON-able copy of a config (dataclasses -> dicts, enums -> values) for manifests."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def register() -> None:
    """Make ``prep_schema`` available to ``defaults:`` lists (idempotent)."""
    ConfigStore.instance().store(name="prep_schema", node=PrepConfig)


def load_config(overrides: Optional[list[str]] = None) -> PrepConfig:
    """Compose ``conf/prep.yaml`` with hydra command-line ``overrides`` and validate it.

    Uses hydra's compose API, so nothing changes directory or writes logs; works whether or not
    hydra is already initialised by the caller (its state is restored afterwards)."""
    register()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides or []))
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # hydra wraps OmegaConf's validation errors; report the root cause in one line
        raise ConfigError(hydra_error_message(e)) from None
    finally:
        restore_gh_from_backup(backup)


def hydra_error_message(e: BaseException) -> str:
    """One line for a hydra/OmegaConf failure: the root cause, with the field it names."""
    while e.__cause__ is not None and not isinstance(e, OmegaConfBaseException):
        e = e.__cause__
    if isinstance(e, OmegaConfBaseException):
        return _omegaconf_message(e)
    return " ".join(str(e).split())
