"""One typed config per entry point. A YAML file (`--config FILE`) overrides the defaults and
CLI flags override the file. Components never receive these objects, only plain arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides):
        """Defaults <- YAML file <- overrides whose value is not None."""
        data = {}
        if path is not None:
            data = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping of config keys")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


def add_config_flags(parser, cls: type[_Config]) -> None:
    """One `--flag` per field of a config (ints and floats typed, the rest strings; default None,
    so `cls.load(..., **flags)` keeps the file's or the default value for flags not given)."""
    for name, field in cls.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name,
                            type={int: int, float: float}.get(field.annotation, str))


class RunnerConfig(_Config):
    runner: Literal["thread", "dask"] = "thread"  # fan-out of shards: Prefect's thread pool or Dask
    dask_address: str | None = None  # an existing Dask scheduler; None starts a LocalCluster
    dask_workers: int = Field(2, ge=1)  # LocalCluster worker processes when no address is given
    max_workers: int = Field(2, ge=1)  # thread pool size


class GenerateConfig(RunnerConfig):
    round: int = Field(0, ge=0)  # the round whose registered anchor generates
    k: int = Field(8, ge=1)  # samples per prompt; raising it later generates only the new indices
    temperature: float = Field(1.0, gt=0)  # 1.0 samples the anchor itself, as BOND's math assumes
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling; 1.0 keeps the anchor's distribution
    max_new_tokens: int = Field(32, ge=1)
    backend: Literal["transformers", "vllm"] = "transformers"  # vllm needs a CUDA GPU
    batch_size: int = Field(64, ge=1)  # sequences per forward pass (prompts x samples)
    shard_prompts: int = Field(32, ge=1)  # prompts per shard: the unit of work, retry and skip
    device: str | None = None  # "cpu", "cuda", ...; None picks cuda when available


class ScoreConfig(RunnerConfig):
    round: int = Field(0, ge=0)
    rm: str  # reward model: a local sequence-classification folder, or "module:function"
    rm_id: str | None = None  # id in the store; defaults to the folder or function name
    batch_size: int = Field(32, ge=1)  # micro-batch size; micro-batches are sorted by length
    device: str | None = None


class BuildConfig(_Config):
    round: int = Field(0, ge=0)
    n: int = Field(8, ge=1)  # the N of Best-of-N that the dataset's weights target
    rm_id: str | None = None  # required when the round has scores from several reward models


class TrainConfig(_Config):
    round: int = Field(0, ge=0)  # train on this round's dataset; writes the anchor of round + 1
    dataset_id: str | None = None  # default: the round's newest dataset
    beta: float = Field(0.5, ge=0, le=1)  # Jeffreys mix: 0 forward (mode covering) .. 1 backward (mode seeking)
    gamma: float = Field(0.0, ge=0)  # weight of KL(pi || anchor), estimated on the anchor's pool
    eta: float = Field(0.0, ge=0, le=1)  # EMA anchor step per optimizer step; 0 = hard refresh at the end
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)  # linear warm-up, then constant
    epochs: int = Field(2, ge=1)  # passes over the dataset
    micro_batch_size: int = Field(64, ge=1)  # sequences per forward pass (grouped by length)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps between resumable checkpoints
    seed: int = 0
    device: str | None = None  # None picks cuda when available; bf16 autocast on cuda
