"""Rounds as Prefect flows: a curated round, and iterative BOND over many rounds.

    round t:  candidates ~ A_t (k per prompt) -> rewards -> exact Best-of-n weights -> dataset
              -> train (Jeffreys + EMA anchor) -> register A_{t+1}
    A_{t+1}'s registration is what round t + 1 starts from; after M rounds the policy approximates
    Best-of-n^M of A_0. Then A_{t+1} is evaluated against pi_0 on held-out prompts and the round's
    report written to reports/round=t/ (trainer/report.py).

Each stage is its own subflow or task and skips what is done, so re-running after a crash resumes
where it stopped: finished shards, datasets and rounds (a registered A_{t+1}) are skipped.
"""

from __future__ import annotations

from prefect import flow, task

from bond_data.config import BuildConfig, GenerateConfig, ScoreConfig
from bond_data.store import Store, StoreError
from flows.report import report_task
from flows.stages import run_build, run_generate, run_score
from trainer.config import EvalConfig, TrainConfig


@flow(name="bond-curate-round")
def curate_round(store: str, generate: dict, score: dict, build: dict) -> dict:
    run_generate(store, GenerateConfig.model_validate(generate))
    scored = run_score(store, ScoreConfig.model_validate(score))
    return run_build(store, BuildConfig.model_validate({**build, "rm_id": build.get("rm_id") or scored["rm_id"]}))


@task(name="train-round", task_run_name="train-round-{cfg[round]}")
def train_task(store: str, cfg: dict) -> dict:
    from bond_data.backends import release
    from bond_data.score import release_reward_models
    from trainer.train import train

    release()  # the round's generator and reward model leave memory before the policy, anchor and AdamW arrive
    release_reward_models()
    return train(store, TrainConfig.model_validate(cfg))


@flow(name="bond-rounds")
def bond_rounds(store: str, num: int, generate: dict, score: dict, build: dict, train: dict,
                evaluate: dict | None = None) -> list[dict]:
    """Run rounds 0..num-1, each from the anchor the previous one registered."""
    st = Store(store)
    done = []
    with st.writing(f"bond rounds --num {num}"):
        _run_rounds(st, num, generate, score, build, train, evaluate or EvalConfig().model_dump(), done)
    return done


def _run_rounds(st: Store, num: int, generate: dict, score: dict, build: dict, train: dict, evaluate: dict,
                done: list) -> None:
    from trainer.report import report_summary

    store = str(st.root)
    for t in range(num):
        if st.anchor(t) is None:
            raise StoreError(f"round {t} has no anchor: register round 0's with `bond init`")
        if st.anchor(t + 1) is not None:
            print(f"round {t}: done (anchor {t + 1} registered), skipping")
            if not (st.root / "reports" / f"round={t}" / "report.md").is_file():  # a run stopped before its report
                print(report_summary(report_task(store, t, evaluate, score)))
            continue
        dataset = curate_round(store, {**generate, "round": t}, {**score, "round": t}, {**build, "round": t})
        result = train_task(store, {**train, "round": t, "dataset_id": dataset["dataset_id"]})
        card = dataset["card"]
        print(f"round {t}: dataset {dataset['dataset_id']}: {card['candidates']} candidates of {card['prompts']} prompts, "
              f"ESS {card['ess_mean']:.2f} of {card['k_max']}, tie rate {card['tie_rate']:.2f}, reward "
              f"{card['mean_reward']:.3f} (one sample) -> {card['bon_reward']:.3f} (Best-of-{dataset['n']})")
        last = result.get("last_step") or {}
        losses = (f", last step loss {last['loss']:.4f} (forward {last['forward']:.4f}, backward {last['backward']:.4f}), "
                  f"mean log pi/A {last['log_ratio']:.3f}") if last else ""
        print(f"round {t}: trained {result.get('steps', 0)} steps{losses}; anchor {t + 1} = "
              f"{result['next_anchor']['anchor_hash'][:12]}")
        report = report_task(store, t, evaluate, score)
        print(report_summary(report))
        done.append({"round": t, "dataset_id": dataset["dataset_id"], "next_anchor": result["next_anchor"],
                     "report": report["report"], "evaluation": report["evaluation"]})


def rounds_deployment(store: str, cron: str, num: int, generate: dict, score: dict, build: dict, train: dict,
                      name: str = "bond-rounds", evaluate: dict | None = None):
    """A deployment of `bond-rounds` on a cron schedule (what `bond serve` serves)."""
    params = {"store": store, "num": num, "generate": generate, "score": score, "build": build, "train": train,
              "evaluate": evaluate or EvalConfig().model_dump()}
    return bond_rounds.to_deployment(name=name, cron=cron, parameters=params)
