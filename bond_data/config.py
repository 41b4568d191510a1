"""Typed configs of the data stages, and what every config shares.

One config object per entry point: defaults here, a YAML file (`--config FILE`) overrides them and
CLI flags override the file. Each field's description is its documentation: `add_config_flags`
turns the fields into `--flags` whose `--help` shows it with the default. Components never receive
these objects, only plain arguments. The trainer's configs live in `trainer/config.py`.
"""

from __future__ import annotations

import argparse
import stat
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the file, line and field."""


class Config(BaseModel):
    # A misspelt key is an error, not a silent default; strict types: `k: true` is not k = 1
    # (an int where a float is expected is still fine).
    model_config = ConfigDict(extra="forbid", strict=True)

    @classmethod
    def load(cls, path: str | Path | None = None, defaults: dict | None = None, **overrides):
        """Field defaults <- `defaults` <- YAML file <- overrides whose value is not None."""
        data = dict(defaults or {})
        if path is not None:
            data.update(read_yaml_mapping(path))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.validate_as(data, str(path) if path is not None else "flags")

    @classmethod
    def validate_as(cls, data: dict, source: str):
        """model_validate, with every problem in one line naming the source and the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{source}: {validation_summary(e)}") from None

    @classmethod
    def from_flags(cls, args: argparse.Namespace, defaults: dict | None = None):
        """`load` of the `--config` file (if any) and the parsed flags that name a field."""
        flags = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
        return cls.load(getattr(args, "config", None), defaults, **flags)


def validation_summary(e: ValidationError) -> str:
    """Pydantic's errors as one line: "field 'k': Input should be a valid integer (got True); ..."."""
    parts = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(top level)"
        got = f" (got {err['input']!r:.40})" if err["type"] not in ("missing", "extra_forbidden") else ""
        message = "unknown key (misspelt?)" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"field '{field}': {message}{got}")
    return "; ".join(parts)


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few lines; anything this big is not one


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML config file as a dict, or ConfigError naming the file (and line) of the problem."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {info.st_size} bytes is too large for a config file")
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: YAML syntax error ({e.problem})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


class FlagParser(argparse.ArgumentParser):
    """argparse, with a misused command line reported as one `error:` line (the command, what was
    wrong, where to read more) and exit code 2, instead of a usage block. Its subcommands' parsers
    are of this class too (add_subparsers makes them of the parent's class)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())}; see `{self.prog} --help`\n")


def add_config_flags(parser: argparse.ArgumentParser, cls: type[Config], skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per field of a config, typed, with its description and default as help. The
    parsed default is None, so `cls.from_flags` keeps the file's or the default value for flags
    not given."""
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        kind, choices = _flag_type(field.annotation)
        default = "required" if field.is_required() else f"default {field.default}"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, choices=choices,
                            help=f"{field.description or ''} ({default})")


def _flag_type(annotation) -> tuple[type, list | None]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(annotation) is Literal:
        return str, list(typing.get_args(annotation))
    if args[0] is bool:
        return boolean, None
    if args[0] in (int, float):
        return args[0], None
    return str, None


def boolean(text: str) -> bool:
    """A yes/no flag's value: true / false (also 1 / 0, yes / no)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


DEVICE_PATTERN = r"^(cpu|cuda(:\d+)?|mps)$"


class RunnerConfig(Config):
    runner: Literal["thread", "dask"] = Field("thread", description="shard fan-out: Prefect's thread pool or Dask")
    dask_address: str | None = Field(None, description="an existing Dask scheduler; none starts a LocalCluster")
    dask_workers: int = Field(2, ge=1, description="LocalCluster worker processes when no address is given")
    max_workers: int = Field(2, ge=1, description="thread pool size")
    retries: int = Field(2, ge=0, description="retries of a shard after a transient failure (I/O, a lost worker, "
                         "a timeout); bad input and bad rewards fail once")
    retry_delay_s: float = Field(2.0, ge=0, description="seconds before a shard's first retry; doubles on each retry")
    shard_timeout_s: float | None = Field(None, gt=0, description="seconds after which a shard fails as timed out "
                                          "and is retried (enforced when its thread next runs Python code: a call "
                                          "blocked in C or I/O is not cut short); none = no limit")


# transformers attention kernels the generator and the trainer can load a model with; varlen is
# bond_data/attention.py's (torch's variable-length flash kernel for packed rows)
Attention = Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "varlen"]


class GenerateConfig(RunnerConfig):
    round: int = Field(0, ge=0, description="the round whose registered anchor generates")
    k: int = Field(8, ge=1, description="samples per prompt; raising it later generates only the new indices")
    temperature: float = Field(1.0, gt=0, description="1.0 samples the anchor itself, as BOND's math assumes")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1.0 keeps the anchor's distribution")
    max_new_tokens: int = Field(32, ge=1, description="completion length cap")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="vllm needs a CUDA GPU")
    batch_size: int = Field(64, ge=1, description="sequences per forward pass (prompts x samples)")
    shard_prompts: int = Field(32, ge=1, description="prompts per shard: the unit of work, retry and skip")
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="cpu, cuda, cuda:N or mps; none picks cuda when available")
    decoding: Literal["dynamic", "static", "static-compiled"] = Field(
        "dynamic", description="transformers KV cache: dynamic, static (preallocated) or static-compiled (static + "
        "torch.compile of the decoding step, CUDA only); all sample the same tokens")
    precision: Literal["auto", "fp32", "bf16-autocast"] = Field(
        "auto", description="transformers: the policy log A is computed under, recorded with each candidate for the "
                            "trainer (bond_data/precision.py); auto = bf16-autocast on cuda, fp32 elsewhere")
    attn_implementation: Attention | None = Field(
        None, description="transformers: the model's attention kernel, as the trainer's attn_implementation; set "
        "both alike so that log A and log pi come from the same kernels (varlen: the teacher-forced log A pass "
        "attends as the trainer does, decoding stays on SDPA; bond_data/attention.py)")
    # vLLM engine arguments (backend vllm only)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of GPU memory the engine reserves")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one model is split across")
    dtype: str = Field("auto", description="vllm: weight dtype (auto, bfloat16, float16, ...)")
    max_model_len: int | None = Field(None, ge=1, description="vllm: context length cap; none takes the model's")

    @field_validator("decoding")
    @classmethod
    def _decoding_can_run(cls, v: str, info: ValidationInfo) -> str:
        """Refused here, before any work, where it cannot run (an explicit --device cuda passes:
        Dask workers may have the GPU the driver lacks)."""
        if v != "dynamic" and info.data.get("backend") != "transformers":
            raise ValueError(f"{v} is a transformers option; vllm has its own")
        if v == "static-compiled":
            from bond_data.device import resolve_device

            if resolve_device(info.data.get("device")).type != "cuda":
                raise ValueError("static-compiled needs a CUDA device; use static or dynamic")
        return v

    def engine_args(self) -> dict:
        """The vLLM engine arguments (LLM(...) keywords) of this config."""
        args = {"gpu_memory_utilization": self.gpu_memory_utilization,
                "tensor_parallel_size": self.tensor_parallel_size, "dtype": self.dtype}
        return {**args, "max_model_len": self.max_model_len} if self.max_model_len else args


class ScoreConfig(RunnerConfig):
    round: int = Field(0, ge=0, description="the round whose candidates are scored")
    rm: str = Field(description="reward model: a local sequence-classification folder, or module:function")
    rm_id: str | None = Field(None, description="id in the store; defaults to the folder or function name")
    batch_size: int = Field(32, ge=1, description="micro-batch size; micro-batches are sorted by length")
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="cpu, cuda, cuda:N or mps; none picks cuda when available")


class BuildConfig(Config):
    round: int = Field(0, ge=0, description="the round whose pool is weighted")
    n: int = Field(8, ge=1, description="the N of Best-of-N that the dataset's weights target")
    rm_id: str | None = Field(None, description="reward model id; required when the round has several")
    weighting: Literal["unbiased", "pool"] = Field(
        "unbiased", description="unbiased: exact Best-of-N of the anchor (needs n <= k); pool: Best-of-N drawn with "
        "replacement from the pool (weaker when n is near k, never 0)")
    target: Literal["anchor", "sampler"] = Field(
        "anchor", description="anchor: refuse pools sampled at temperature or top_p != 1; sampler: distil Best-of-N of "
        "that sampler (its log-probs stand in for the anchor's)")
    license: str = Field(
        "other", pattern=r"^[a-z0-9][a-z0-9.+-]*$", description="the dataset card's license: a Hugging Face license "
        "id (apache-2.0, mit, cc-by-4.0, ...) or other; set on a new dataset (`bond export --license` on a copy)")
