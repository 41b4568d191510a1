"""Prefect flows for the curation stages: generate, score, build.

Thin: each flow calls the stage of `bond_data.stages` (the same checks, orphan cleanup, planning
and registration as the no-Prefect path) with an executor that submits each shard as a Prefect
task and hands back manifests as they complete; the driver registers each one as it arrives.

Run from Python (`run_generate(store, GenerateConfig(...))`) or from the CLI (`bond generate`).
`runner="dask"` fans out with prefect-dask's DaskTaskRunner: a LocalCluster of `dask_workers`
processes, or the scheduler at `dask_address`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prefect import flow, task
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from bond_data import generate, score, stages
from bond_data.backends.base import Sampling
from bond_data.config import BuildConfig, GenerateConfig, RunnerConfig, ScoreConfig
from bond_data.store import Store, StoreError
from flows.tether import tie_temporary_server

tie_temporary_server()  # Prefect's temporary server dies with this process, kill -9 included


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups, never bad input or a bad reward (those fail the same way again)."""
    try:
        state.result()
    except (ValueError, StoreError, ImportError):
        return False
    except Exception:
        return True
    return False


generate_shard_task = task(generate.generate_shard, name="generate-shard", retries=2,
                           retry_condition_fn=_transient, task_run_name="generate-{plan[shard_id]}")
score_shard_task = task(score.score_shard, name="score-shard", retries=2,
                        retry_condition_fn=_transient, task_run_name="score-{candidates[shard_id]}")
_SHARD_TASKS = {generate.generate_shard: generate_shard_task, score.score_shard: score_shard_task}


def prefect_shards(fn: Callable[..., dict], calls: list[tuple]) -> Iterable[dict]:
    """A `bond_data.stages.ShardRunner`: every call as a task on the flow's task runner, results
    in order of completion."""
    futures = [_SHARD_TASKS[fn].submit(*args) for args in calls]
    for future in as_completed(futures):
        yield future.result()


@flow(name="bond-generate")
def generate_flow(store: str, cfg: dict) -> dict:
    c = GenerateConfig.model_validate(cfg)
    engine_args = c.engine_args() if c.backend == "vllm" else None
    result = stages.generate_round(Store(store), c.round, c.k, Sampling(c.temperature, c.top_p, c.max_new_tokens),
                                   c.shard_prompts, c.backend, c.batch_size, c.device, engine_args,
                                   run_shards=prefect_shards)
    print(stages.generate_summary(result))
    return result


@flow(name="bond-score")
def score_flow(store: str, cfg: dict) -> dict:
    c = ScoreConfig.model_validate(cfg)
    result = stages.score_round(Store(store), c.round, c.rm, c.rm_id, c.batch_size, c.device,
                                run_shards=prefect_shards)
    print(stages.score_summary(result))
    return result


@flow(name="bond-build")
def build_flow(store: str, cfg: dict) -> dict:
    c = BuildConfig.model_validate(cfg)
    return stages.build_round(Store(store), c.round, c.n, c.rm_id, c.weighting, c.target)


def task_runner(cfg: RunnerConfig):
    if cfg.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.dask_workers, "threads_per_worker": 1, "processes": True})
    return ThreadPoolTaskRunner(max_workers=cfg.max_workers)


def run_generate(store: str, cfg: GenerateConfig) -> dict:
    return generate_flow.with_options(task_runner=task_runner(cfg))(str(store), cfg.model_dump())


def run_score(store: str, cfg: ScoreConfig) -> dict:
    return score_flow.with_options(task_runner=task_runner(cfg))(str(store), cfg.model_dump())


def run_build(store: str, cfg: BuildConfig) -> dict:
    return build_flow(str(store), cfg.model_dump())
