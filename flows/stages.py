"""Prefect flows for the curation stages: generate, score, build.

Thin: each flow calls the stage of `bond_data.stages` (the same checks, orphan cleanup, planning
and registration as the no-Prefect path) with an executor that submits each shard as a Prefect
task and hands back manifests as they complete; the driver registers each one as it arrives.

Run from Python (`run_generate(store, GenerateConfig(...))`) or from the CLI (`bond generate`).
`runner="dask"` fans out with prefect-dask's DaskTaskRunner: a LocalCluster of `dask_workers`
processes, or the scheduler at `dask_address`.

What Prefect shows: runs named for what they do (`generate-r3`, its shards `generate-r3-<shard>`,
`score-r3-<rm>`, `build-r3-n8`), tagged `store:<path>` and `round:<R>`; one table artifact per
stage (key `<store>-generate-r3`, ...) holding the figures of the stage's summary line; shard tasks
retried with exponential backoff on transient failures only, and failed as hung after
`shard_timeout_s`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, tags, task
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from bond_data import generate, score, stages
from bond_data.backends.base import Sampling
from bond_data.config import BuildConfig, GenerateConfig, RunnerConfig, ScoreConfig
from bond_data.errors import out_of_memory
from bond_data.stages import ShardRunner
from bond_data.store import Store, StoreError
from flows.tether import tie_temporary_server

tie_temporary_server()  # Prefect's temporary server dies with this process, kill -9 included


# ---- retries -----------------------------------------------------------------------------------
def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups, lost workers and timeouts; never bad input, a bad reward model, a store
    refusal (ValueError covers RewardError and ConfigError) or a device out of memory: those fail
    the same way again (the same batch on the same device), and the CLI names the setting to change."""
    try:
        state.result()
    except (ValueError, StoreError, ImportError):
        return False
    except Exception as e:
        return not out_of_memory(e)
    return False


def retry_options(retries: int, delay_s: float, timeout_s: float | None = None) -> dict:
    """Task options: `retries` retries of transient failures after delay_s, 2 delay_s, 4 delay_s...;
    a run longer than timeout_s fails with a TimeoutError (transient: retried)."""
    return {"retries": retries, "retry_delay_seconds": exponential_backoff(delay_s), "retry_condition_fn": _transient,
            "timeout_seconds": timeout_s}


generate_shard_task = task(generate.generate_shard, name="generate-shard", task_run_name="generate-{plan[shard_id]}",
                           **retry_options(2, 2.0))
score_shard_task = task(score.score_shard, name="score-shard", task_run_name="score-{candidates[shard_id]}-{rm_id}",
                        **retry_options(2, 2.0))
_SHARD_TASKS = {generate.generate_shard: generate_shard_task, score.score_shard: score_shard_task}


def prefect_shards(cfg: RunnerConfig) -> ShardRunner:
    """A `bond_data.stages.ShardRunner`: every call as a task on the flow's task runner, with the
    config's retries and timeout, results in order of completion."""
    options = retry_options(cfg.retries, cfg.retry_delay_s, cfg.shard_timeout_s)

    def run(fn: Callable[..., dict], calls: list[tuple]) -> Iterable[dict]:
        shard_task = _SHARD_TASKS[fn].with_options(**options)
        futures = [shard_task.submit(*args) for args in calls]
        for future in as_completed(futures):
            yield future.result()

    return run


# ---- names, tags, artifacts --------------------------------------------------------------------
@contextmanager
def run_tags(store: str | Path, round_: int):
    """Every flow and task run started inside carries the store and the round."""
    with tags(f"store:{Path(store).resolve()}", f"round:{round_}"):
        yield


def artifact_key(store: str | Path, *parts: object) -> str:
    """`<store folder name>-<6 hex digits of its absolute path's sha1>-<parts>` in the form Prefect
    requires (lowercase letters, digits, dashes): two stores with one folder name keep apart."""
    root = Path(store).resolve()
    text = "-".join(str(p) for p in (root.name, hashlib.sha1(str(root).encode()).hexdigest()[:6], *parts))
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def publish(store: str | Path, key: str, title: str, figures: list[tuple[str, object]]) -> None:
    """A stage's figures as a table artifact (metric, value); its description names the store."""
    create_table_artifact([{"metric": m, "value": v} for m, v in figures], key=key,
                          description=f"{title} (store {Path(store).resolve()})")


def generate_figures(pool: dict, result: dict | None = None) -> list[tuple[str, object]]:
    """The round's pool (`Store.pool_summary`), and what this run added when there was a run."""
    now = [("shards generated now", result["shards_generated"]), ("k", result["k"])] if result else []
    return [*now, ("shards in the round", pool["shards"]), ("prompts", pool["prompts"]),
            ("candidates", pool["candidates"]), ("completion tokens", pool["tokens"]),
            ("finished with EOS (stop)", pool["stop"]), ("cut at max_new_tokens (length)", pool["length"])]


def score_figures(summary: dict, result: dict | None = None) -> list[tuple[str, object]]:
    """One reward model's scores of the round (`Store.score_summary`), and this run's shards."""
    now = [("shards scored now", result["shards_scored"])] if result else []
    return [*now, ("candidates scored", summary["scored"]), ("reward mean", round(summary["mean"], 4)),
            ("reward std", round(summary["std"], 4)), ("reward min", round(summary["min"], 4)),
            ("reward max", round(summary["max"], 4))]


def build_figures(record: dict) -> list[tuple[str, object]]:
    """A dataset's summary: `bond build` prints it as its table, the build artifact holds it."""
    card = record["card"]
    return [("prompts", card["prompts"]), ("candidates", card["candidates"]), ("tie rate", f"{card['tie_rate']:.3f}"),
            ("effective sample size / prompt", f"{card['ess_mean']:.2f} of {card['k_max']}"),
            ("mean reward (one sample of the anchor)", f"{card['mean_reward']:.4f}"),
            (f"Best-of-{record['n']} reward (what the weights target)", f"{card['bon_reward']:.4f}")]


def build_line(record: dict) -> str:
    card = record["card"]
    return (f"round {record['round']}: dataset {record['dataset_id']}: {card['candidates']} candidates of "
            f"{card['prompts']} prompts, ESS {card['ess_mean']:.2f} of {card['k_max']}, tie rate {card['tie_rate']:.2f}, "
            f"reward {card['mean_reward']:.3f} (one sample) -> {card['bon_reward']:.3f} (Best-of-{record['n']})")


# ---- flows -------------------------------------------------------------------------------------
@flow(name="bond-generate", flow_run_name="generate-r{cfg[round]}")
def generate_flow(store: str, cfg: dict) -> dict:
    c = GenerateConfig.model_validate(cfg)
    engine_args = c.engine_args() if c.backend == "vllm" else {
        "decoding": c.decoding, "attn_implementation": c.attn_implementation,
        "precision": c.precision}  # weights held for the run's one policy (bf16 linear layers under bf16-autocast)
    st = Store(store)
    sampling = Sampling(c.temperature, c.top_p, c.max_new_tokens, c.precision)
    result = stages.generate_round(st, c.round, c.k, sampling,
                                   c.shard_prompts, c.backend, c.batch_size, c.device, engine_args,
                                   run_shards=prefect_shards(c))
    print(stages.generate_summary(result))  # this run: candidates, tokens, tokens/s, finish reasons
    publish(store, artifact_key(store, "generate", f"r{c.round}"), f"generate, round {c.round}",
            generate_figures(st.pool_summary(c.round), result))
    return result


def _score_run_name() -> str:
    cfg = ScoreConfig.model_validate(flow_run.parameters["cfg"])
    return f"score-r{cfg.round}-{rm_label(cfg)}"


@flow(name="bond-score", flow_run_name=_score_run_name)
def score_flow(store: str, cfg: dict) -> dict:
    c = ScoreConfig.model_validate(cfg)
    st = Store(store)
    result = stages.score_round(st, c.round, c.rm, c.rm_id, c.batch_size, c.device, run_shards=prefect_shards(c))
    print(stages.score_summary(result))  # the round's rewards under this reward model: mean, std, min, max
    summary = result["rewards"]  # Store.score_summary
    if summary["scored"]:
        publish(store, artifact_key(store, "score", f"r{c.round}", result["rm_id"]),
                f"score, round {c.round}, reward model {result['rm_id']}", score_figures(summary, result))
    return result


@flow(name="bond-build", flow_run_name="build-r{cfg[round]}-n{cfg[n]}")
def build_flow(store: str, cfg: dict) -> dict:
    c = BuildConfig.model_validate(cfg)
    record = stages.build_round(Store(store), c.round, c.n, c.rm_id, c.weighting, c.target, c.license)
    print(build_line(record))
    publish(store, artifact_key(store, "build", f"r{c.round}", f"n{c.n}"),
            f"build, round {c.round}, Best-of-{c.n}", [("dataset", record["dataset_id"]),
            ("weighting", record.get("weighting", "pool")), ("reward model", record["rm_id"]), *build_figures(record)])
    return record


def task_runner(cfg: RunnerConfig):
    if cfg.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.dask_workers, "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=cfg.max_workers)


def rm_label(cfg: ScoreConfig) -> str:
    """The reward model's id as `bond_data.score.describe_reward_model` derives it, without
    importing or hashing anything: only for the run's name."""
    return cfg.rm_id or (Path(cfg.rm).name if Path(cfg.rm).is_dir() else cfg.rm.partition(":")[2] or cfg.rm)


def run_generate(store: str, cfg: GenerateConfig) -> dict:
    with run_tags(store, cfg.round):
        return generate_flow.with_options(task_runner=task_runner(cfg))(str(store), cfg.model_dump())


def run_score(store: str, cfg: ScoreConfig) -> dict:
    with run_tags(store, cfg.round):
        return score_flow.with_options(task_runner=task_runner(cfg))(str(store), cfg.model_dump())


def run_build(store: str, cfg: BuildConfig) -> dict:
    with run_tags(store, cfg.round):
        return build_flow(str(store), cfg.model_dump())
