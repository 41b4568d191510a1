"""One implementation of each data stage of a round: generate, score, build.

A stage is: checks and planning on the driver (here), one function per shard that a worker runs
(`generate.generate_shard`, `score.score_shard`: they only write Parquet and return a manifest),
and the registration of each finished shard in the catalog as it arrives (only the driver writes
the catalog). `run_shards` is the executor: by default the shards run one after another in this
process (notebooks, benchmarks, tests); the Prefect flows (flows/stages.py) pass one that submits
each shard as a task (a thread pool or Dask) and yields manifests as they complete. The anchor
check, the orphan cleanup, the planning and the registration are this same code on both paths. A stage holds the store's writer lease
from planning to its last registration: a second writer is refused at once, readers never wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from bond_data import build, generate, score
from bond_data.backends.base import Sampling
from bond_data.progress import Progress
from bond_data.store import Store, StoreError

# run_shards(fn, calls) runs fn(*args) for each args in calls and yields the manifests, in any order
ShardRunner = Callable[[Callable[..., dict], list[tuple]], Iterable[dict]]


def run_serially(fn: Callable[..., dict], calls: list[tuple]) -> Iterable[dict]:
    for args in calls:
        yield fn(*args)


def register_as_completed(store: Store, manifests: Iterable[dict], progress: Progress | None = None,
                          shards: int = 0) -> list[dict]:
    """Register each shard the moment it is written (a crash later loses none of them) and count
    its rows on the stage's progress bar; the manifests registered."""
    done = []
    for manifest in manifests:
        store.register_shards([manifest])
        done.append(manifest)
        if progress is not None:
            progress.advance(manifest["num_rows"], note=f"{len(done)}/{shards} shards")
    return done


# ---- generate ----------------------------------------------------------------------------------
def check_generate(store: Store, round_: int, sampling: Sampling | None = None, backend: str = "transformers",
                   device: str | None = None) -> dict:
    """The round's anchor, or a StoreError saying how to register one (the CLI checks this before
    Prefect starts). With `sampling`: also refuses to add candidates drawn otherwise than the round's
    (temperature, top_p, max_new_tokens, precision policy): one pool, one sampler."""
    anchor = store.anchor(round_)
    if anchor is None:
        hint = "run `bond init --anchor DIR` first" if round_ == 0 else f"train round {round_ - 1} first (`bond train`)"
        raise StoreError(f"round {round_} has no registered anchor: {hint}")
    if sampling is not None:
        _check_same_sampler(store.sampling_settings(round_), sampling, backend, device, round_)
    return anchor


def _check_same_sampler(existing: list[dict], sampling: Sampling, backend: str, device: str | None, round_: int) -> None:
    """A round's pool must come from one sampler: its weights are Best-of-N of that sampler, and the
    trainer divides by one log A. New candidates must match the round's recorded settings."""
    if not existing:
        return
    wanted = {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens}
    if backend == "transformers":  # vLLM records its own `vllm-<dtype>`, settled by its engine
        from bond_data import precision as precision_policy
        from bond_data.device import resolve_device

        wanted["precision"] = precision_policy.resolve(sampling.precision, resolve_device(device))
    for old in existing:
        differ = {key: (old.get(key), value) for key, value in wanted.items()
                  if old.get(key) is not None and old.get(key) != value}
        if differ:
            said = ", ".join(f"{key} {new!r} (the round's: {was!r})" for key, (was, new) in differ.items())
            raise StoreError(f"round {round_} already has candidates drawn otherwise; this run asks {said}. One pool, one "
                             f"sampler: generate with the round's settings, or start the new settings in a new round or store")


def plan_generate(store: Store, round_: int, k: int, shard_prompts: int, sampling: Sampling | None = None,
                  backend: str = "transformers", device: str | None = None) -> tuple[dict, list[dict]]:
    """The round's anchor and the shards still missing, after deleting a killed run's orphans."""
    anchor = check_generate(store, round_, sampling, backend, device)
    store.remove_orphans(f"candidates/round={round_}")
    return anchor, generate.plan_generation(store, round_, k, shard_prompts)


def generate_round(store: Store, round_: int, k: int, sampling: Sampling, shard_prompts: int = 32,
                   backend: str = "transformers", batch_size: int = 64, device: str | None = None,
                   engine_args: dict | None = None, run_shards: ShardRunner = run_serially) -> dict:
    """Sample the round's missing candidates (k per prompt) from its registered anchor."""
    t0 = time.perf_counter()
    with store.writing(f"bond generate --round {round_} --k {k}"):
        anchor, plans = plan_generate(store, round_, k, shard_prompts, sampling, backend, device)
        calls = [(str(store.root), plan, anchor, backend, sampling, batch_size, device, engine_args) for plan in plans]
        rows = sum(len(job["sample_indices"]) for plan in plans for job in plan["jobs"])
        with Progress(f"generate round {round_}", rows, "candidates") as bar:
            done = register_as_completed(store, run_shards(generate.generate_shard, calls), bar, len(plans))
    stats = generate.generation_stats(store.root, done, time.perf_counter() - t0)
    return {"round": round_, "k": k, "shards_generated": len(done), **stats}


def generate_summary(result: dict) -> str:
    """The one line a generate run ends with: candidates, tokens, tokens/s, finish reasons."""
    head = f"round {result['round']}: generated {result['shards_generated']} shard(s)"
    if not result["shards_generated"]:
        return f"{head}: nothing missing at k = {result['k']}"
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(result["finish_reasons"].items()))
    return (f"{head}, {result['candidates']} candidates (k = {result['k']}), {result['tokens']} tokens in "
            f"{result['seconds']:.1f} s ({result['tokens_per_s']:.0f} tokens/s); finish: {reasons}")


# ---- score -------------------------------------------------------------------------------------
def check_score(store: Store, round_: int, spec: str, rm_id: str | None, device: str | None = None) -> str:
    """Everything about a scoring run that can fail before any work: the spec, a changed reward
    model under a registered id, a round with no candidates, and the reward model itself on one
    small batch of the round. Returns the reward model's id; registers nothing."""
    rid, rhash = score.describe_reward_model(spec, rm_id)
    store.check_reward_model(rid, rhash, spec)
    shards = store.registered_shards("candidates", round_)
    if not shards:
        raise StoreError(f"round {round_} has no candidates: run `bond generate --round {round_}` first")
    prompt_files = [m["path"] for m in store.registered_shards("prompts")]
    score.try_reward_model(str(store.root), shards[0], prompt_files, spec, rid, device)
    return rid


def plan_score(store: Store, round_: int, spec: str, rm_id: str | None) -> tuple[str, str, list[dict], list[str]]:
    """(rm_id, rm_hash, the round's candidates shards it has not scored, the prompt files to read).
    Refuses a changed reward model under a registered id; registers nothing."""
    rid, rhash = score.describe_reward_model(spec, rm_id)
    store.check_reward_model(rid, rhash, spec)
    store.remove_orphans(f"scores/round={round_}/rm={rid}")
    prompt_files = [m["path"] for m in store.registered_shards("prompts")]
    return rid, rhash, score.plan_scoring(store, round_, rid), prompt_files


def score_round(store: Store, round_: int, spec: str, rm_id: str | None = None, batch_size: int = 32,
                device: str | None = None, run_shards: ShardRunner = run_serially) -> dict:
    """Score the round's unscored candidates shards with one reward model, tried first on one small
    batch. The reward model is registered with its first scored shard: a run that scores nothing
    registers nothing."""
    with store.writing(f"bond score --round {round_} --rm {spec}"):
        rid, rhash, todo, prompt_files = plan_score(store, round_, spec, rm_id)
        if todo:
            score.try_reward_model(str(store.root), todo[0], prompt_files, spec, rid, device)
        calls = [(str(store.root), m, prompt_files, spec, rid, batch_size, device) for m in todo]
        rows = sum(m["num_rows"] for m in todo)

        def with_reward_model(manifests: Iterable[dict]) -> Iterable[dict]:
            for i, manifest in enumerate(manifests):
                if i == 0:
                    store.register_reward_model(rid, rhash, spec)
                yield manifest

        with Progress(f"score round {round_} ({rid})", rows, "rewards") as bar:
            done = register_as_completed(store, with_reward_model(run_shards(score.score_shard, calls)), bar, len(todo))
        rewards = store.score_summary(round_, rid)
    return {"round": round_, "rm_id": rid, "shards_scored": len(done), "rewards": rewards}


def score_summary(result: dict) -> str:
    """The one line a score run ends with: the round's rewards under this reward model."""
    head = f"round {result['round']}: scored {result['shards_scored']} shard(s) with {result['rm_id']}"
    r = result.get("rewards")
    if not r or not r["scored"]:
        return f"{head}; no rewards in the store yet"
    return (f"{head}; {r['scored']} rewards in the round: mean {r['mean']:.4f}, std {r['std']:.4f}, "
            f"min {r['min']:.4f}, max {r['max']:.4f}")


# ---- build -------------------------------------------------------------------------------------
def check_build(store: Store, round_: int, n: int, rm_id: str | None, weighting: str = "unbiased",
                target: str = "anchor") -> str:
    """The reward model the dataset would use, if the round can be built (the CLI checks this before
    Prefect starts): fully scored, sampled as the target requires, pools of at least n."""
    return build.check_buildable(store, round_, n, rm_id, weighting, target)


def build_round(store: Store, round_: int, n: int, rm_id: str | None = None, weighting: str = "unbiased",
                target: str = "anchor", license: str = "other") -> dict:
    """Write (or find) the round's Best-of-n weighted dataset; its catalog record and summary."""
    with Progress(f"build round {round_}", 1, "dataset") as bar:
        record = build.build_dataset(store, round_, n, rm_id, weighting, target, license)
        bar.advance(1)
    return record


def curate_round(store: Store, round_: int, k: int, reward: str, n: int, max_new_tokens: int = 16) -> dict:
    """generate -> score -> build in this process, with default settings; the dataset's record."""
    generate_round(store, round_, k, Sampling(max_new_tokens=max_new_tokens))
    rm_id = score_round(store, round_, reward)["rm_id"]
    return build_round(store, round_, n, rm_id)
