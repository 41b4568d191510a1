"""One curation round as one Prefect flow: generate -> score -> build.

    candidates ~ A_t (k per prompt)  ->  rewards  ->  exact Best-of-n weights  ->  dataset

Each stage is its own subflow (flows/stages.py), so a re-run after a crash skips what is done.
(The trainer issue appends train -> register A_{t+1} to this sequence.)
"""

from __future__ import annotations

from prefect import flow

from bond_data.config import BuildConfig, GenerateConfig, ScoreConfig
from flows.stages import run_build, run_generate, run_score


@flow(name="bond-curate-round", log_prints=True)
def curate_round(store: str, generate: dict, score: dict, build: dict) -> dict:
    run_generate(store, GenerateConfig.model_validate(generate))
    scored = run_score(store, ScoreConfig.model_validate(score))
    return run_build(store, BuildConfig.model_validate({**build, "rm_id": build.get("rm_id") or scored["rm_id"]}))
