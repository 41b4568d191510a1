"""Rounds as Prefect flows: a curated round, and iterative BOND over many rounds.

    round t:  candidates ~ A_t (k per prompt) -> rewards -> exact Best-of-n weights -> dataset
              -> train (Jeffreys + EMA anchor) -> register A_{t+1}
    A_{t+1}'s registration is what round t + 1 starts from; after M rounds the policy approximates
    Best-of-n^M of A_0. Then A_{t+1} is evaluated against pi_0 on held-out prompts and the round's
    report written to reports/round=t/ (trainer/report.py).

Each stage is its own subflow or task and skips what is done, so re-running after a crash resumes
where it stopped: finished shards, datasets and rounds (a registered A_{t+1}) are skipped.
In Prefect: `rounds-0-to-2` runs `round-0`, `round-1`, ... each of which runs `curate-r0`
(`generate-r0`, `score-r0-<rm>`, `build-r0-n2`) and the task `train-r0`; every run is tagged with
the store and the round, each stage leaves a table artifact and each round a Markdown one.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from bond_data.config import BuildConfig, GenerateConfig, ScoreConfig
from bond_data.store import Store, StoreError
from flows.report import report_task
from flows.stages import (artifact_key, build_figures, generate_figures, publish, retry_options, run_build,
                          run_generate, run_score, run_tags, score_figures)
from trainer.config import EvalConfig, TrainConfig


@flow(name="bond-curate-round", flow_run_name="curate-r{generate[round]}")
def curate_round(store: str, generate: dict, score: dict, build: dict) -> dict:
    run_generate(store, GenerateConfig.model_validate(generate))
    scored = run_score(store, ScoreConfig.model_validate(score))
    return run_build(store, BuildConfig.model_validate({**build, "rm_id": build.get("rm_id") or scored["rm_id"]}))


def train_figures(result: dict) -> list[tuple[str, object]]:
    last = result.get("last_step") or {}
    terms = [(f"last step {k}", round(last[k], 4)) for k in ("loss", "forward", "backward", "anchor_kl", "log_ratio")
             if k in last]
    return [("steps", result.get("steps", 0)), *terms, ("next anchor", result["next_anchor"]["anchor_hash"][:12])]


def train_line(result: dict) -> str:
    last = result.get("last_step") or {}
    losses = (f", last step loss {last['loss']:.4f} (forward {last['forward']:.4f}, backward {last['backward']:.4f}), "
              f"mean log pi/A {last['log_ratio']:.3f}") if last else ""
    if result.get("padding") is not None:
        losses += f", padding {result['padding']:.1%} of the positions fed"
    if result.get("tokens_per_s"):
        mfu = f" (MFU {result['mfu']:.1%})" if result.get("mfu") else ""
        losses += f", {result['tokens_per_s']:,.0f} tokens/s{mfu}"
    return (f"round {result['round']}: trained {result.get('steps', 0)} steps{losses}; anchor {result['round'] + 1} = "
            f"{result['next_anchor']['anchor_hash'][:12]}")


# A training run resumes from its last checkpoint, so a retry after a transient failure (a lost
# device, a full disk freed) loses at most checkpoint_every steps. No timeout: one round's training
# may legitimately take hours.
@task(name="train-round", task_run_name="train-r{cfg[round]}", **retry_options(2, 10.0))
def train_task(store: str, cfg: dict) -> dict:
    from bond_data.backends import release
    from bond_data.score import release_reward_models
    from trainer.train import train

    release()  # the round's generator and reward model leave memory before the policy, anchor and AdamW arrive
    release_reward_models()
    result = train(store, TrainConfig.model_validate(cfg))
    if not result.get("skipped"):
        publish(store, artifact_key(store, "train", f"r{cfg['round']}"), f"train, round {cfg['round']}",
                train_figures(result))
    return result


# Sampling settings a round takes from the one before unless set (flag or config key): a tour that
# generated round 0 with --max-new-tokens 16 keeps 16 in the rounds that follow.
INHERITED_SAMPLING = ("temperature", "top_p", "max_new_tokens")


def inherit_sampling(st: Store, t: int, generate: dict, explicit: list[str] | None) -> tuple[dict, list[str]]:
    """Round t's generate settings: each of INHERITED_SAMPLING not in `explicit` takes the value
    recorded in the candidates of round t (a round already begun) or else of round t-1; `explicit`
    None means every key was set. Returns the settings and the changes from that round, as text
    ("max_new_tokens 16 -> 32"), which the round prints and records in its result and artifact."""
    if explicit is None:
        explicit = list(INHERITED_SAMPLING)
    recorded = []
    for source in (t, t - 1):
        if source >= 0 and (recorded := st.sampling_settings(source)):
            break
    if len(recorded) != 1:  # nothing to inherit from, or a round that mixed settings: the given ones
        return generate, []
    previous, out, changes = recorded[0], dict(generate), []
    for key in INHERITED_SAMPLING:
        if key not in previous:
            continue
        if key not in explicit:
            out[key] = previous[key]
        elif out[key] != previous[key]:
            changes.append(f"{key} {previous[key]} -> {out[key]}")
    return out, changes


@flow(name="bond-round", flow_run_name="round-{round_}")
def round_flow(store: str, round_: int, generate: dict, score: dict, build: dict, train: dict,
               evaluate: dict, generate_set: list[str] | None = None) -> dict:
    """One round: curate (generate, score, build), train, register the next anchor; its summary as
    a Markdown artifact; then evaluate the new anchor and write the round's report (trainer/report.py),
    published as a second Markdown artifact."""
    from pathlib import Path

    from trainer.report import report_summary

    t = round_
    generate, changes = inherit_sampling(Store(store), t, generate, generate_set)
    if changes:
        print(f"round {t}: sampling changed from the previous round: {', '.join(changes)}")
    dataset = curate_round(store, {**generate, "round": t}, {**score, "round": t}, {**build, "round": t})
    result = train_task(store, {**train, "round": t, "dataset_id": dataset["dataset_id"]})
    print(train_line({**result, "round": t}))
    create_markdown_artifact(round_markdown(store, t, dataset, result, changes), key=artifact_key(store, "round", t),
                             description=f"round {t} of {Store(store).root}")
    report = report_task(store, t, evaluate, score)
    print(report_summary(report))
    create_markdown_artifact(Path(report["report"]).read_text(), key=artifact_key(store, "report", t),
                             description=f"round {t}'s report: {report['report']}")
    return {"round": t, "dataset_id": dataset["dataset_id"], "next_anchor": result["next_anchor"],
            "sampling_changes": changes, "report": report["report"], "evaluation": report["evaluation"]}


def round_markdown(store: str, t: int, dataset: dict, result: dict, changes: list[str] = ()) -> str:
    """The round's summary table: each stage's figures, from the same functions as the stage
    artifacts and summary lines (the pool and scores as the round holds them)."""
    st = Store(store)
    rows = ([("generate", m, v) for m, v in generate_figures(st.pool_summary(t))]
            + [("score", m, v) for m, v in score_figures(st.score_summary(t, dataset["rm_id"]))]
            + [("build", m, v) for m, v in build_figures(dataset)] + [("train", m, v) for m, v in train_figures(result)])
    rows += [("generate", "sampling changed from the previous round", c) for c in changes]
    table = "\n".join(f"| {stage} | {m} | {v} |" for stage, m, v in rows)
    return (f"# Round {t}\n\nstore `{st.root}`; dataset `{dataset['path']}`\n\n"
            f"| stage | metric | value |\n|---|---|---|\n{table}\n")


def _rounds_name() -> str:
    params = flow_run.parameters
    return f"rounds-0-to-{params['num'] - 1}"


@flow(name="bond-rounds", flow_run_name=_rounds_name)
def bond_rounds(store: str, num: int, generate: dict, score: dict, build: dict, train: dict,
                evaluate: dict | None = None, generate_set: list[str] | None = None) -> list[dict]:
    """Run rounds 0..num-1, each from the anchor the previous one registered. Sampling settings not
    in `generate_set` (the generate keys the user set; None: all of them) follow the previous round's
    (`inherit_sampling`)."""
    st = Store(store)
    done = []
    with st.writing(f"bond rounds --num {num}"):
        _run_rounds(st, num, generate, score, build, train, evaluate or EvalConfig().model_dump(), done, generate_set)
    return done


def _run_rounds(st: Store, num: int, generate: dict, score: dict, build: dict, train: dict, evaluate: dict,
                done: list, generate_set: list[str] | None = None) -> None:
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
        with run_tags(store, t):
            done.append(round_flow(store, t, generate, score, build, train, evaluate, generate_set))


def rounds_deployment(store: str, cron: str | None, num: int, generate: dict, score: dict, build: dict, train: dict,
                      name: str = "bond-rounds", evaluate: dict | None = None, generate_set: list[str] | None = None):
    """A deployment of `bond-rounds` (what `bond serve` serves or puts on a work pool). Its
    entrypoint is the module path `flows.round.bond_rounds`: any process where the package is
    installed loads it, whatever its working directory."""
    from prefect.types.entrypoint import EntrypointType

    params = {"store": store, "num": num, "generate": generate, "score": score, "build": build, "train": train,
              "evaluate": evaluate or EvalConfig().model_dump(), "generate_set": generate_set}
    return bond_rounds.to_deployment(name=name, cron=cron, parameters=params, tags=[f"store:{store}"],
                                     entrypoint_type=EntrypointType.MODULE_PATH)
