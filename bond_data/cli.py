"""`bond`: the command line. Every subcommand is a thin call into bond_data / flows.

    bond demo      [--store DIR]                       the built-in tiny task, one curated round
    bond init      --store DIR --anchor MODEL_DIR      register round 0's anchor (the generator)
    bond prompts add --store DIR FILE                  JSONL, Parquet or a save_to_disk folder
    bond generate  --store DIR [--round R] [--k K]     Prefect flow, a task per shard
    bond score     --store DIR [--round R] [--rm SPEC] [--rm-id ID]
    bond build     --store DIR [--round R] --n N [--rm ID]
    bond sql       --store DIR "QUERY" [--format table|csv|json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import flows  # noqa: F401  (sets Prefect's environment defaults before Prefect is imported)
from bond_data.config import BuildConfig, GenerateConfig, ScoreConfig

TINY_REWARD = "bond_data.tiny_task:reward"


def _runner_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", choices=["thread", "dask"], help="shard fan-out (default thread)")
    p.add_argument("--dask-address", help="scheduler address of an existing Dask cluster")
    p.add_argument("--dask-workers", type=int, help="LocalCluster workers when no address is given")
    p.add_argument("--max-workers", type=int, help="thread pool size")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bond", description="BOND: Best-of-N distillation pipeline")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build the tiny task and curate one round on it")
    p.add_argument("--store", default="demo-store")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--n", type=int, default=8)

    p = sub.add_parser("init", help="register the anchor (generator) of a round")
    p.add_argument("--store", required=True)
    p.add_argument("--anchor", required=True, help="a transformers model folder")
    p.add_argument("--round", type=int, default=0)

    p = sub.add_parser("prompts", help="manage prompts")
    psub = p.add_subparsers(dest="action", required=True)
    pa = psub.add_parser("add", help="validate and add prompts (duplicates folded by content)")
    pa.add_argument("--store", required=True)
    pa.add_argument("file")

    p = sub.add_parser("generate", help="sample k candidates per prompt from the round's anchor")
    p.add_argument("--store", required=True)
    p.add_argument("--config", help="YAML file with GenerateConfig keys")
    for flag, typ in [("round", int), ("k", int), ("temperature", float), ("top-p", float),
                      ("max-new-tokens", int), ("batch-size", int), ("shard-prompts", int), ("device", str)]:
        p.add_argument(f"--{flag}", type=typ)
    p.add_argument("--backend", choices=["transformers", "vllm"])
    _runner_flags(p)

    p = sub.add_parser("score", help="score a round's candidates with a reward model")
    p.add_argument("--store", required=True)
    p.add_argument("--config", help="YAML file with ScoreConfig keys")
    p.add_argument("--round", type=int)
    p.add_argument("--rm", help=f"sequence-classification folder or module:function (default {TINY_REWARD})")
    p.add_argument("--rm-id", help="id of the reward model in the store (default: its name)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    _runner_flags(p)

    p = sub.add_parser("build", help="write the round's Best-of-N weighted distillation dataset")
    p.add_argument("--store", required=True)
    p.add_argument("--config", help="YAML file with BuildConfig keys")
    p.add_argument("--round", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--rm", "--rm-id", dest="rm_id", help="reward model id (needed if the round has several)")

    p = sub.add_parser("sql", help="query the store read-only")
    p.add_argument("--store", required=True)
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    return ap


def _fields(args: argparse.Namespace, cls) -> dict:
    return {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bond_data.prompts import PromptError
    from bond_data.score import RewardError
    from bond_data.store import StoreError

    try:
        return COMMANDS[args.command](args) or 0
    except (PromptError, RewardError, StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_init(args) -> None:
    from bond_data.store import Store, folder_sha256

    anchor = Path(args.anchor).resolve()
    Store(args.store).register_anchor(args.round, str(anchor), folder_sha256(anchor), config={"source": "bond init"})
    print(f"round {args.round}: anchor {anchor}")


def cmd_prompts(args) -> None:
    from bond_data.prompts import add_prompts
    from bond_data.store import Store

    summary = add_prompts(Store(args.store), args.file)
    print(f"{args.file}: read {summary['read']}, added {summary['added']}, already present {summary['duplicates']}")


def cmd_generate(args) -> None:
    from flows.stages import run_generate

    print(json.dumps(run_generate(args.store, GenerateConfig.load(args.config, **_fields(args, GenerateConfig)))))


def cmd_score(args) -> None:
    from flows.stages import run_score

    cfg = ScoreConfig.load(args.config, **{"rm": TINY_REWARD, **_fields(args, ScoreConfig)})
    print(json.dumps(run_score(args.store, cfg)))


def cmd_build(args) -> None:
    from flows.stages import run_build

    record = run_build(args.store, BuildConfig.load(args.config, **_fields(args, BuildConfig)))
    print_summary(record, args.store)


def cmd_sql(args) -> None:
    from bond_data.store import Store, read_only_query

    table = read_only_query(Store(args.store), args.query)
    if args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    elif args.format == "json":
        print(json.dumps(table.to_pylist(), default=str, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        out = Table(*table.column_names)
        for row in table.to_pylist():
            out.add_row(*[_cell(v) for v in row.values()])
        Console().print(out)


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_summary(record: dict, store: str) -> None:
    from rich.console import Console
    from rich.table import Table

    card = record["card"]
    t = Table(title=f"dataset {record['dataset_id']} (round {record['round']}, Best-of-{record['n']}, rm {record['rm_id']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("prompts", card["prompts"]), ("candidates", card["candidates"]),
            ("tie rate", f"{card['tie_rate']:.3f}"),
            ("effective sample size / prompt", f"{card['ess_mean']:.2f} of {card['k_max']}"),
            ("mean reward (one sample of the anchor)", f"{card['mean_reward']:.4f}"),
            (f"Best-of-{record['n']} reward (what the weights target)", f"{card['bon_reward']:.4f}")]
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)
    print(f"dataset: {Path(store) / record['path']} (card: README.md beside it)")


def cmd_demo(args) -> None:
    from bond_data.prompts import add_prompts
    from bond_data.store import Store, folder_sha256
    from bond_data.tiny_task import ensure_tiny_task
    from flows.round import curate_round

    task = ensure_tiny_task()
    store = Store(args.store)
    store.register_anchor(0, str(task.model_dir), folder_sha256(task.model_dir), config={"source": "tiny task"})
    add_prompts(store, task.prompts_file)
    record = curate_round(
        str(store.root),
        generate=GenerateConfig(round=0, k=args.k, max_new_tokens=16).model_dump(),
        score=ScoreConfig(round=0, rm=task.reward).model_dump(),
        build={"round": 0, "n": args.n},
    )
    print_summary(record, args.store)
    print(f'try: bond sql --store {args.store} "SELECT prompt_id, avg(reward), max(reward) FROM pool GROUP BY 1 LIMIT 5"')


COMMANDS = {"demo": cmd_demo, "init": cmd_init, "prompts": cmd_prompts, "generate": cmd_generate,
            "score": cmd_score, "build": cmd_build, "sql": cmd_sql}

if __name__ == "__main__":
    raise SystemExit(main())
