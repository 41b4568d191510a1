"""Prefect flows for the curation stages: generate, score, build. Thin: each task calls one
`bond_data` function; the flow plans the missing shards, fans them out, and registers each
finished shard in the catalog as it arrives (only this driver process writes the catalog).

Run from Python (`run_generate(store, GenerateConfig(...))`) or from the CLI (`bond generate`).
`runner="dask"` fans out with prefect-dask's DaskTaskRunner: a LocalCluster of `dask_workers`
processes, or the scheduler at `dask_address`.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from bond_data import build, generate, score
from bond_data.config import BuildConfig, GenerateConfig, RunnerConfig, ScoreConfig
from bond_data.store import Store, StoreError


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups, never bad input or a bad reward (those fail the same way again)."""
    try:
        state.result()
    except (ValueError, StoreError, ImportError):
        return False
    except Exception:
        return True
    return False


@task(retries=2, retry_condition_fn=_transient, task_run_name="generate-{plan[shard_id]}")
def generate_shard_task(store_root: str, plan: dict, anchor: dict, cfg: dict) -> dict:
    sampling = generate.Sampling(cfg["temperature"], cfg["top_p"], cfg["max_new_tokens"])
    return generate.generate_shard(store_root, plan, anchor, cfg["backend"], sampling, cfg["batch_size"], cfg["device"])


@task(retries=2, retry_condition_fn=_transient, task_run_name="score-{candidates[shard_id]}")
def score_shard_task(store_root: str, candidates: dict, prompt_files: list[str], cfg: dict) -> dict:
    return score.score_shard(store_root, candidates, prompt_files, cfg["rm"], cfg["rm_id"], cfg["batch_size"], cfg["device"])


def _register_as_completed(store: Store, futures: list) -> int:
    """Register each shard the moment its task finishes: a crash later loses none of them."""
    for future in as_completed(futures):
        store.register_shards([future.result()])
    return len(futures)


@flow(name="bond-generate", log_prints=True)
def generate_flow(store: str, cfg: dict) -> dict:
    st = Store(store)
    anchor = st.anchor(cfg["round"])
    if anchor is None:
        raise StoreError(f"round {cfg['round']} has no registered anchor: run `bond init --anchor DIR` first")
    st.remove_orphans(f"candidates/round={cfg['round']}")
    plans = generate.plan_generation(st, cfg["round"], cfg["k"], cfg["shard_prompts"])
    futures = [generate_shard_task.submit(str(st.root), p, anchor, cfg) for p in plans]
    done = _register_as_completed(st, futures)
    print(f"round {cfg['round']}: generated {done} shard(s); k = {cfg['k']}")
    return {"round": cfg["round"], "shards_generated": done}


@flow(name="bond-score", log_prints=True)
def score_flow(store: str, cfg: dict) -> dict:
    st = Store(store)
    rm_id, rm_hash = score.describe_reward_model(cfg["rm"], cfg["rm_id"])
    st.register_reward_model(rm_id, rm_hash, cfg["rm"])
    st.remove_orphans(f"scores/round={cfg['round']}/rm={rm_id}")
    prompt_files = [m["path"] for m in st.registered_shards("prompts")]
    todo = score.plan_scoring(st, cfg["round"], rm_id)
    futures = [score_shard_task.submit(str(st.root), m, prompt_files, {**cfg, "rm_id": rm_id}) for m in todo]
    done = _register_as_completed(st, futures)
    print(f"round {cfg['round']}: scored {done} shard(s) with {rm_id}")
    return {"round": cfg["round"], "rm_id": rm_id, "shards_scored": done}


@flow(name="bond-build", log_prints=True)
def build_flow(store: str, cfg: dict) -> dict:
    return build.build_dataset(Store(store), cfg["round"], cfg["n"], cfg["rm_id"])


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
