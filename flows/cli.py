"""`bond`: the command line, the top of the layers (it imports bond_data, trainer and flows).
Every subcommand parses its flags into a config, then makes one call into a flow or a component.

    bond demo      [--store DIR] [--rounds 3 --k 8 --n 2]   the tiny task: iterative BOND, a table, a plot
    bond init      --store DIR --anchor MODEL_DIR      register round 0's anchor (the generator)
    bond prompts add --store DIR FILE                  JSONL, Parquet or a save_to_disk folder
    bond generate  --store DIR [--round R] [--k K]     Prefect flow, a task per shard
    bond score     --store DIR [--round R] [--rm SPEC] [--rm-id ID]
    bond build     --store DIR [--round R] --n N [--rm-id ID]
    bond sql       --store DIR "QUERY" [--format table|csv|json]
    bond export    --store DIR --dataset ID --to OUT [--format parquet|arrow] [--license ID]
    bond status    --store DIR [--format json]          rounds, pools, scores, datasets, the next stage
    bond migrate   --store DIR                          a store written before the manifest catalog
    bond train     --store DIR --round R [--beta B --eta E ...]   (torchrun: python -m trainer.train)
    bond train-online --policy DIR --prompts FILE --out DIR [--rm SPEC --steps S ...]   online J-BOND
    bond rounds    --store DIR --num M [--n 2 --k 8 ...]          iterative BOND, resumable
    bond serve     --store DIR --num M [--cron "0 3 * * *"] [--pool P]   the rounds flow as a deployment
    bond report    --store DIR                          rebuild reports/ (every round, index.md / .html)

Flags come from the configs' fields (`--help` shows each one's description and default); one
meaning per flag everywhere: `--rm` is a reward-model spec, `--rm-id` its id in the store.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

import flows  # noqa: F401  (sets Prefect's environment defaults before Prefect is imported)
from bond_data.config import (
    BuildConfig,
    FlagParser,
    GenerateConfig,
    ScoreConfig,
    add_config_flags,
)
from bond_data.tasks.tiny import REWARD_SPEC as TINY_REWARD
from trainer.config import (
    MEMORY_HINT,
    TINY_ITERATIVE_LR,
    TINY_TRAIN,
    EvalConfig,
    OnlineConfig,
    TrainConfig,
)

RM_HELP = f"reward model: a sequence-classification folder or module:function (default {TINY_REWARD})"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bond-pipeline")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    ap = FlagParser(prog="bond", description="BOND: Best-of-N distillation pipeline")  # misuse: one error: line
    ap.add_argument("--version", action="version", version=f"bond {_version()}")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="show Prefect's own log lines (run and task states, its temporary server)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the tiny task: rounds of Best-of-n distillation, a table and a plot")
    p.add_argument("--store", default="demo-store")
    p.add_argument("--rounds", type=int, default=3, help="rounds of iterative BOND (default 3)")
    p.add_argument("--k", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--n", type=int, default=2, help="Best-of-n per round (default 2)")

    p = sub.add_parser("init", help="register the anchor (generator) of a round")
    p.add_argument("--store", required=True)
    p.add_argument("--anchor", required=True, help="a transformers model folder")
    p.add_argument("--round", type=int, default=0)

    p = sub.add_parser("prompts", help="manage prompts")
    psub = p.add_subparsers(dest="action", required=True)
    pa = psub.add_parser("add", help="validate and add prompts (duplicates folded by content)")
    pa.add_argument("--store", required=True)
    pa.add_argument("file")

    for name, cls, text in (("generate", GenerateConfig, "sample k candidates per prompt from the round's anchor"),
                            ("score", ScoreConfig, "score a round's candidates with a reward model"),
                            ("build", BuildConfig, "write the round's Best-of-N weighted distillation dataset"),
                            ("train", TrainConfig, "train on a round's dataset and register the next anchor")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--store", required=True)
        p.add_argument("--config", help=f"YAML file with {cls.__name__} keys (flags override it)")
        add_config_flags(p, cls, skip=("rm",))
        if cls is ScoreConfig:
            p.add_argument("--rm", help=RM_HELP)

    p = sub.add_parser("train-online", help="online J-BOND (paper Algorithm 2): fresh samples, EMA anchor")
    p.add_argument("--policy", required=True, help="starting policy and anchor (a transformers folder)")
    p.add_argument("--prompts", required=True, help="a JSONL, Parquet or save_to_disk prompts file")
    p.add_argument("--out", required=True,
                   help="folder for the trained policy (the EMA anchor in OUT/anchor, metrics in OUT-metrics.jsonl)")
    p.add_argument("--rm", default=TINY_REWARD, help=RM_HELP)
    p.add_argument("--config", help="YAML file with OnlineConfig keys (flags override it)")
    add_config_flags(p, OnlineConfig)

    for cmd in ("rounds", "serve"):
        p = sub.add_parser(cmd, help="iterative BOND: generate, score, build, train, M rounds" if cmd == "rounds"
                           else "serve the rounds flow as a Prefect deployment on a cron schedule")
        p.add_argument("--store", required=True)
        p.add_argument("--num", type=int, required=True, help="rounds in all (done ones are skipped)")
        p.add_argument("--config", help="YAML with sections generate, score, build, train, evaluate")
        p.add_argument("--n", type=int, help="Best-of-n per round (build.n)")
        p.add_argument("--k", type=int, help="samples per prompt (generate.k)")
        p.add_argument("--rm", help=f"{RM_HELP} (score.rm)")
        for key in ("max_new_tokens", "temperature", "top_p"):
            field = GenerateConfig.model_fields[key]
            p.add_argument(f"--{key.replace('_', '-')}", type=field.annotation, help=f"{field.description} "
                           f"(generate.{key}; unset: the previous round's, else {field.default})")
        if cmd == "serve":
            p.add_argument("--cron", help='schedule, e.g. "0 3 * * *" (none: runs only when started by hand)')
            p.add_argument("--name", default="bond-rounds", help="deployment name (default bond-rounds)")
            p.add_argument("--pool", help="register the deployment on this Prefect work pool and exit (a worker "
                           "runs it: `prefect worker start --pool POOL`); without it, serve from this process")

    p = sub.add_parser("status", help="the store at a glance: rounds, pools, scores, datasets, the next stage")
    p.add_argument("--store", required=True)
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = sub.add_parser("report", help="rebuild the store's reports from what it holds: every round's and the index")
    p.add_argument("--store", required=True)

    p = sub.add_parser("migrate", help="move a store's DuckDB catalog of an earlier version to the manifest catalog")
    p.add_argument("--store", required=True)

    p = sub.add_parser("export", help="a built dataset as a self-contained folder with its card (load_dataset / load_from_disk)")
    p.add_argument("--store", required=True)
    p.add_argument("--dataset", required=True, help="the dataset id (`bond status` lists them)")
    p.add_argument("--to", required=True, help="a new or empty folder outside the store")
    p.add_argument("--format", choices=["parquet", "arrow"], default="parquet",
                   help="parquet: datasets.load_dataset(DIR); arrow: datasets.load_from_disk(DIR) (default parquet)")
    p.add_argument("--license", help="the card's license (a Hugging Face license id); default: the one it was built with")

    p = sub.add_parser("sql", help="query the store read-only")
    p.add_argument("--store", required=True)
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--timeout", type=float, help="stop the query after this many seconds (exit code 124)")
    for command in [*sub.choices.values(), *psub.choices.values()]:  # `bond prompts add`'s wins over `prompts`'
        command.set_defaults(command_parser=command)  # whose --help an unrecognized flag points to
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    if not (sys.argv[1:] if argv is None else argv):  # `bond` alone: what it can do, not an error line
        parser.print_help()
        return 2
    args, extras = parser.parse_known_args(argv)
    if extras:  # named by the (sub)command they were given to, whose --help lists what it takes
        args.command_parser.error(f"unrecognized arguments: {' '.join(extras)}")
    _quiet_prefect(args.verbose)
    mask = None
    if args.command == "sql" and threading.current_thread() is threading.main_thread():
        # Before pyarrow and DuckDB start their threads, which inherit the mask: Ctrl-C then reaches
        # only the query's watcher (bond_data.store.read_only_query), which stops the query.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return _run(args, argv)
    finally:
        if mask is not None:  # a caller in this process (a test, a notebook) gets its mask back
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _memory_hint(command: str) -> str:
    """The settings that shrink what `command` holds on its device."""
    return {"generate": "lower --batch-size (sequences per forward pass) or --max-new-tokens",
            "score": "lower --batch-size (sequences per reward-model call)",
            "train": MEMORY_HINT,
            "train-online": "lower --gen-batch-size or --prompts-per-step",
            "rounds": "lower the rounds config's generate.batch_size, score.batch_size or train.micro_batch_size (or "
                      "set train.activation_checkpointing: true)"}.get(command, "use smaller batches")


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The command, with every user error reported as one `error:` line and its exit code."""
    from bond_data.errors import error_line
    from bond_data.store import QueryInterrupted, QueryTimeout

    try:
        if args.command in CHECKS:  # flags that cannot work are refused before the store is touched
            CHECKS[args.command](args)
        with _writer_lease(args, argv if argv is not None else sys.argv[1:]), _warning_lines():
            return COMMANDS[args.command](args) or 0
    except QueryInterrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 130
    except QueryTimeout as e:
        print(f"error: {e}", file=sys.stderr)
        return 124
    except Exception as e:  # a user error or a device out of memory: one line; a bug keeps its traceback
        line = error_line(e, _memory_hint(args.command))
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); what was registered stays registered, a re-run resumes", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _warning_lines():
    """Our own warnings (bond_data.errors.LogAMismatch) as one `warning:` line each on stderr, not
    Python's file:line format; any other warning as Python shows it."""
    import warnings

    from bond_data.errors import LogAMismatch

    with warnings.catch_warnings():
        show = warnings.showwarning

        def line(message, category, *args, **kwargs):
            if issubclass(category, LogAMismatch):
                print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = line
        yield


def _quiet_prefect(verbose: bool) -> None:
    """Prefect's log lines (states of every run and task, its temporary server) and Hugging Face's
    loading bars stay off unless -v: a failure is reported once, as our one `error:` line, and
    progress is ours to print."""
    import logging

    level = "INFO" if verbose else "CRITICAL"
    os.environ["PREFECT_LOGGING_LEVEL"] = level  # for Prefect imported later, and its server
    logging.getLogger("prefect").setLevel(level)  # for Prefect already imported (tests, notebooks)
    if not verbose:  # Hugging Face's "Loading weights" / "Writing model shards" bars and notices
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()


# Commands that write the store take its writer lease here, before Prefect or a model starts, so a
# second writer is refused at once with one line naming the first (its command line, host, pid).
# Only these create a store; the others need one (a misspelt --store must not create a folder).
CREATORS = {"demo", "init", "prompts"}
WRITERS = CREATORS | {"generate", "score", "build", "train", "rounds", "migrate"}


def _writer_lease(args, argv: list[str]):
    import shlex

    if args.command not in WRITERS:
        return contextlib.nullcontext()
    from bond_data.store import Store, StoreError

    store = Store(args.store)
    legacy = (store.root / "catalog.duckdb").is_file()
    if args.command not in CREATORS and not store.exists() and not (args.command == "migrate" and legacy):
        hint = "run `bond migrate` once" if legacy else "create one with `bond init --store DIR --anchor MODEL`"
        raise StoreError(f"no BOND store at {store.root}: {hint}")
    return store.writing(shlex.join(["bond", *argv]))


def cmd_init(args) -> None:
    from bond_data.files import folder_sha256
    from bond_data.store import Store

    anchor = Path(args.anchor).resolve()
    Store(args.store).register_anchor(args.round, str(anchor), folder_sha256(anchor), config={"source": "bond init"})
    print(f"round {args.round}: anchor {anchor}")


def cmd_status(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from bond_data.store import Store

    status = Store(args.store).status()
    if args.format == "json":
        print(json.dumps(status, indent=1, default=str))
        return
    console = Console(width=max(Console().width, 120))
    console.print(f"store {status['store']}: {status['prompts']} prompts, {len(status['rounds'])} anchor(s)")
    t = Table(title="rounds")
    for col in ["round", "anchor", "parent", "candidates (shards)", "k", "scored per reward model", "datasets", "next anchor"]:
        t.add_column(col)
    anchors = {r["round"]: r for r in status["rounds"]}
    for r in status["per_round"]:
        a = anchors.get(r["round"])
        k = f"{r['k_min']}-{r['k_max']}" if r["k_min"] is not None and r["k_min"] != r["k_max"] else str(r["k_max"] or "")
        scored = ", ".join(f"{s['rm_id']}: {s['scored']}" for s in r["scores"]) or "-"
        built = "; ".join(f"n={d['n']} {d['weighting'] or 'pool'}: {d['rows']} rows, ESS {d['ess_mean']:.2f}, "
                          f"reward {d['mean_reward']:.3f} -> {d['bon_reward']:.3f}" for d in r["datasets"]) or "-"
        t.add_row(str(r["round"]), a["anchor_hash"][:12] if a else "-", str(a["parent_round"]) if a and a["parent_round"] is not None else "-",
                  f"{r['candidates']} ({r['candidate_shards']})", k, scored, built, "registered" if r["trained"] else "-")
    console.print(t)
    console.print(f"next: {status['next']}")


def cmd_migrate(args) -> None:
    from bond_data.store import Store

    store = Store(args.store)  # main() holds the lease, which migrates an older catalog
    shards = store.query("SELECT count(*) AS n FROM shards").column("n")[0].as_py()
    print(f"{store.root}: catalog in {store.catalog_dir} ({shards} shards registered); readers: {store.root / 'store.sql'}")


def cmd_prompts(args) -> None:
    from bond_data.prompts import add_prompts
    from bond_data.store import Store

    summary = add_prompts(Store(args.store), args.file)
    print(f"{args.file}: read {summary['read']}, added {summary['added']}, already present {summary['duplicates']}")


def cmd_generate(args) -> None:
    from bond_data.backends.base import Sampling
    from bond_data.stages import check_generate
    from bond_data.store import Store
    from flows.stages import run_generate

    cfg = GenerateConfig.from_flags(args)
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.precision)
    check_generate(Store(args.store), cfg.round, sampling, cfg.backend, cfg.device)  # before Prefect starts
    print(json.dumps(run_generate(args.store, cfg)))


def cmd_score(args) -> None:
    from bond_data.stages import check_score
    from bond_data.store import Store
    from flows.stages import run_score

    cfg = ScoreConfig.from_flags(args, defaults={"rm": TINY_REWARD})
    check_score(Store(args.store), cfg.round, cfg.rm, cfg.rm_id, cfg.device)  # before Prefect starts
    print(json.dumps(run_score(args.store, cfg)))


def cmd_build(args) -> None:
    from bond_data.stages import check_build
    from bond_data.store import Store
    from flows.stages import run_build

    cfg = BuildConfig.from_flags(args)
    check_build(Store(args.store), cfg.round, cfg.n, cfg.rm_id, cfg.weighting, cfg.target)  # before Prefect starts
    record = run_build(args.store, cfg)
    print_summary(record, args.store)


def cmd_train(args) -> None:
    from trainer.train import train

    print(json.dumps(train(args.store, TrainConfig.from_flags(args)), default=str))


def cmd_train_online(args) -> None:
    from bond_data.prompts import read_prompts
    from trainer.online import train_online

    cfg = OnlineConfig.from_flags(args)
    prompts = read_prompts(args.prompts).column("prompt").to_pylist()
    # metrics beside the output: the checkpoint folder itself is replaced whole when saved
    metrics = Path(f"{Path(args.out)}-metrics.jsonl")
    summary = train_online(args.policy, prompts, args.rm, Path(args.out), cfg, metrics_path=metrics)
    print(f"metrics: {metrics}")
    print(json.dumps(summary, default=str))


SECTIONS = {"generate": GenerateConfig, "score": ScoreConfig, "build": BuildConfig, "train": TrainConfig,
            "evaluate": EvalConfig}


def rounds_params(args) -> dict:
    """generate / score / build / train / evaluate sections: defaults <- YAML sections <- flags. A
    section or key that does not exist is an error, as in every other config; so is a held-out
    prompts file that is not there."""
    from bond_data.config import ConfigError, read_yaml_mapping

    source = args.config or "flags"
    sections = read_yaml_mapping(args.config) if args.config else {}
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown} (misspelt?); sections are {list(SECTIONS)}")
    for name, value in sections.items():
        if not isinstance(value, dict | None):
            raise ConfigError(f"{source}: section '{name}' must be a mapping of keys, got {type(value).__name__}")
    flags = {"generate": {"k": args.k, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                          "top_p": args.top_p},
             "score": {"rm": args.rm}, "build": {"n": args.n}, "train": {}, "evaluate": {}}
    defaults = {"score": {"rm": TINY_REWARD}}
    params = {name: cls.validate_as({**defaults.get(name, {}), **(sections.get(name) or {}),
                                     **{k: v for k, v in flags[name].items() if v is not None}},
                                    f"{source} [{name}]").model_dump()
              for name, cls in SECTIONS.items()}
    # the generate keys the user set (config or flag): the others follow the previous round's sampling
    params["generate_set"] = sorted(set(sections.get("generate") or {})
                                    | {k for k, v in flags["generate"].items() if v is not None})
    held_out = params["evaluate"]["prompts"]
    if held_out and params["evaluate"]["enabled"] and not Path(held_out).is_file():
        raise ConfigError(f"{source} [evaluate]: field 'prompts': no such file {held_out}")
    generate, train = params["generate"], params["train"]
    if generate["attn_implementation"] is None and generate["backend"] == "transformers":
        generate["attn_implementation"] = train["attn_implementation"]  # log A computed as the trainer's log pi
    n, k = params["build"]["n"], params["generate"]["k"]
    if "k" in params["generate_set"]:  # otherwise k follows the previous round's: the build checks the pool
        check_n_within_k(n, k, params["build"]["weighting"], f"{source}: [build] n = {n} > [generate] k = {k}",
                         "raise k or set [build] weighting: pool")
    return params


def check_n_within_k(n: int, k: int, weighting: str, where: str, advice: str) -> None:
    """Unbiased weights average over n-subsets of each prompt's k samples: settings asking n > k are
    refused before anything is generated (bond_data/build.py checks the pool itself)."""
    from bond_data.config import ConfigError

    if weighting == "unbiased" and n > k:
        raise ConfigError(f"{where}: unbiased Best-of-{n} weights need n <= k samples per prompt; {advice}")


def check_rounds(args) -> None:
    """`bond rounds` / `bond serve` settings, checked before the store lease (`CHECKS`)."""
    from bond_data.config import ConfigError

    if args.num < 0:
        raise ConfigError(f"--num {args.num}: the number of rounds in all cannot be negative")
    rounds_params(args)


def cmd_rounds(args) -> None:
    from bond_data.score import describe_reward_model
    from bond_data.stages import check_generate
    from bond_data.store import Store
    from flows.round import bond_rounds

    params = rounds_params(args)
    check_generate(Store(args.store), 0)  # before Prefect starts
    describe_reward_model(params["score"]["rm"], params["score"]["rm_id"])
    print(json.dumps(bond_rounds(str(Path(args.store).resolve()), args.num, **params), default=str))


def cmd_serve(args) -> None:
    from flows.round import rounds_deployment

    deployment = rounds_deployment(str(Path(args.store).resolve()), args.cron, args.num, **rounds_params(args),
                                   name=args.name)
    when = f"on cron {args.cron!r}" if args.cron else "on demand"
    if args.pool:
        _check_work_pool(args.pool)
        deployment.apply(work_pool_name=args.pool)
        print(f"deployment bond-rounds/{args.name} ({when}) on work pool {args.pool!r}; a worker runs it: "
              f"prefect worker start --pool {args.pool}; start one now: prefect deployment run bond-rounds/{args.name}")
        return
    from prefect import serve

    print(f"serving bond-rounds/{args.name} {when}; Ctrl-C stops")
    serve(deployment)


def _check_work_pool(name: str) -> None:
    """A missing work pool is a user error (the server would otherwise create one that no worker serves)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ValueError("--pool needs a Prefect server that outlives this command (the temporary one would take "
                         "the deployment with it): set PREFECT_API_URL, e.g. to a `prefect server start`")
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            raise ValueError(f"work pool {name!r} does not exist: create it with "
                             f"`prefect work-pool create --type process {name}`") from None


def cmd_export(args) -> None:
    from bond_data.export import export_dataset
    from bond_data.store import Store

    if args.license is not None:  # the same check as the build's `license` key
        BuildConfig.validate_as({"license": args.license}, "--license")
    out = export_dataset(Store(args.store), args.dataset, args.to, args.format, args.license)
    load = "load_dataset" if args.format == "parquet" else "load_from_disk"
    print(f"{out['to']}: {out['rows']} rows of {out['dataset_id']} ({out['format']}, license {out['license']}); "
          f"datasets.{load}({out['to']!r})")


def cmd_report(args) -> None:
    from bond_data.store import Store, StoreError
    from trainer.report import write_store_report

    store = Store(args.store)
    if not store.exists():
        raise StoreError(f"no BOND store at {store.root}")
    print(f"report: {write_store_report(store)} (and index.html beside it)")


def cmd_sql(args) -> None:
    from bond_data.store import Store, read_only_query

    table = read_only_query(Store(args.store), args.query, timeout=args.timeout)
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
        # Not a terminal (a pipe, a file): as wide as the table needs, never truncated.
        Console(width=None if sys.stdout.isatty() else 10_000).print(out)


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_summary(record: dict, store: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from flows.stages import build_figures

    t = Table(title=f"dataset {record['dataset_id']} (round {record['round']}, Best-of-{record['n']}, "
                    f"{record.get('weighting', 'pool')} weights, rm {record['rm_id']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in build_figures(record):
        t.add_row(k, str(v))
    Console().print(t)
    print(f"dataset: {Path(store) / record['path']} (card: README.md beside it)")


def cmd_demo(args) -> None:
    """Iterative BOND on the tiny task; every round evaluates its new anchor against pi_0 on the
    held-out prompts and writes its report (the same path as `bond rounds`)."""
    from bond_data.files import folder_sha256
    from bond_data.prompts import add_prompts
    from bond_data.store import Store
    from bond_data.tasks.tiny import ensure_tiny_task
    from flows.round import bond_rounds
    from trainer.report import REPORTS, evaluation_rows, round_dir

    generate, build = demo_settings(args)
    task = ensure_tiny_task()
    store = Store(args.store)
    store.register_anchor(0, str(task.model_dir), folder_sha256(task.model_dir), config={"source": "tiny task"})
    add_prompts(store, task.prompts_file)
    bond_rounds(str(store.root), args.rounds, generate=generate.model_dump(),
                score=ScoreConfig(rm=task.reward).model_dump(), build=build.model_dump(),
                train={**TrainConfig.load(TINY_TRAIN).model_dump(), "lr": TINY_ITERATIVE_LR},  # rounds of Best-of-2
                evaluate=EvalConfig(prompts=str(task.eval_prompts_file), rm=task.reward, max_new_tokens=16).model_dump())
    last = args.rounds - 1
    print_rounds(evaluation_rows(store, last), args.n)
    print(f"report: {store.root / REPORTS / 'index.md'} (index.html beside it); "
          f"plot: {round_dir(store.root, last) / 'reward_vs_kl.png'}")
    print(f'try: bond sql --store {args.store} "SELECT round, avg(reward) AS one_sample, '
          f'avg(bon_weight * reward) AS best_of_{args.n} FROM bon_pool({args.n}) GROUP BY round ORDER BY round"')


def demo_settings(args) -> tuple[GenerateConfig, BuildConfig]:
    """`bond demo`'s generate and build settings from its flags, or one error naming the flag:
    checked before the store is created or touched (`CHECKS`)."""
    if args.rounds < 1:
        raise ValueError(f"bond demo --rounds {args.rounds}: the demo runs at least one round")
    generate = GenerateConfig.validate_as({"k": args.k, "max_new_tokens": 16}, "bond demo --k")
    build = BuildConfig.validate_as({"n": args.n}, "bond demo --n")
    check_n_within_k(build.n, generate.k, build.weighting, f"bond demo --n {build.n} --k {generate.k}",
                     f"raise --k to {build.n} or more")
    return generate, build


CHECKS = {"demo": demo_settings, "rounds": check_rounds, "serve": check_rounds}


def print_rounds(rows: list[dict], n: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from trainer.report import num

    t = Table(title=f"iterative BOND, Best-of-{n} per round, evaluated on held-out prompts against pi_0's pool; "
                    "BoN: Best-of-N sampling measured the same way, its KL exact (ties included)")
    for col in ["round", "N = n^t", "reward", "BoN reward", "log p_le", "BoN log p_le", "KL(pi_t||pi_0)", "BoN KL"]:
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        b = r["bon"] or dict.fromkeys(("reward", "log_p_le", "kl"))
        t.add_row(str(r["round"]), str(r["N"]), f"{r['reward']:.4f}", num(b["reward"], 4),
                  f"{r['log_p_le']:.3f}", num(b["log_p_le"], 3), f"{r['kl']:.3f}", num(b["kl"], 3))
    Console(width=max(Console().width, 110)).print(t)


COMMANDS = {"demo": cmd_demo, "init": cmd_init, "migrate": cmd_migrate, "status": cmd_status, "prompts": cmd_prompts, "generate": cmd_generate,
            "score": cmd_score, "build": cmd_build, "sql": cmd_sql, "export": cmd_export, "train": cmd_train, "train-online": cmd_train_online, "rounds": cmd_rounds,
            "serve": cmd_serve, "report": cmd_report}

if __name__ == "__main__":
    raise SystemExit(main())
