"""The report step of a round in Prefect: evaluate the new anchor, write reports/round=R/.

Thin, like every task here: `trainer.report.report_round` does the work and can be called without
Prefect; this resolves the `evaluate` section (held-out prompts default to the built-in task's when
the reward is a built-in task's) and runs it as a task.
"""

from __future__ import annotations

from prefect import task

from bond_data.store import Store
from trainer.config import EvalConfig


def held_out_prompts(evaluate: dict, score: dict) -> tuple[str | None, str]:
    """(held-out prompts file or None: not evaluated, reward spec) of a rounds run's sections."""
    from bond_data.tasks import HELD_OUT_PROMPTS

    c = EvalConfig.model_validate(evaluate)
    reward = c.rm or score["rm"]
    prompts = (c.prompts or HELD_OUT_PROMPTS.get(reward)) if c.enabled else None
    return (str(prompts) if prompts else None), reward


@task(name="report-round", task_run_name="report-r{round_}")
def report_task(store: str, round_: int, evaluate: dict, score: dict) -> dict:
    """Evaluate the round's new anchor (kept evaluations reused), write reports/round=R/ and the index."""
    from trainer.report import report_round

    c = EvalConfig.model_validate(evaluate)
    prompts, reward = held_out_prompts(evaluate, score)
    return report_round(Store(store), round_, prompts, reward, c.pool_k, c.samples_per_prompt, c.max_new_tokens)
