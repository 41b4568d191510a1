"""Scoring: reward models turn candidates shards into scores shards (one per candidates shard and RM).

A reward model is either a local `AutoModelForSequenceClassification` folder (one output logit)
or a Python callable given as `module:function`, taking a list of (prompt, completion) pairs and
returning one float each. Its id defaults to the folder or function name; its hash is the content
of the folder or of the callable's module file, so a changed reward model cannot silently reuse
an id. Micro-batches are sorted by length (less padding); a NaN or infinite reward is an error
naming the candidate, never a number that reaches the weights.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bond_data import schema
from bond_data.device import free_memory, resolve_device
from bond_data.errors import out_of_memory
from bond_data.files import folder_sha256, write_parquet_atomic
from bond_data.store import Store, shard_manifest


class RewardError(ValueError):
    """A reward model returned something unusable; the message names the candidate."""


@dataclass
class RewardModel:
    rm_id: str
    rm_hash: str
    spec: str
    score_batch: Callable[[list[tuple[str, str]]], list[float]]
    # A sequence-classification model takes (messages, completion) for chat prompts and renders the
    # whole conversation with its own chat template; a callable always takes (prompt text, completion).
    takes_messages: bool = False


def _check_id(rm_id: str) -> str:
    """An id names folders (scores/round=R/rm=ID/), so it stays a plain file name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", rm_id):
        raise RewardError(f"reward model id {rm_id!r}: use letters, digits, '_', '-' or '.' (at most 64)")
    return rm_id


def describe_reward_model(spec: str, rm_id: str | None = None) -> tuple[str, str]:
    """(rm_id, rm_hash) of a spec without loading model weights."""
    path = Path(spec)
    if path.is_dir():
        return _check_id(rm_id or path.name), folder_sha256(path)
    module_name, _, func_name = spec.partition(":")
    if not func_name:
        raise RewardError(f"reward model {spec!r}: not a folder, and not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward model {spec!r}: cannot import module {module_name!r} ({e})") from None
    if not callable(getattr(module, func_name, None)):
        raise RewardError(f"reward model {spec!r}: module {module_name!r} has no callable {func_name!r}")
    source = inspect.getsource(module)
    return _check_id(rm_id or func_name), hashlib.sha256(f"{spec}\0{source}".encode()).hexdigest()


_LOADED: dict[tuple, RewardModel] = {}
_LOCK = threading.Lock()


def load_reward_model(spec: str, rm_id: str | None = None, device: str | None = None) -> RewardModel:
    """Load once per process (workers share it across shards)."""
    with _LOCK:
        key = (spec, rm_id, device)
        if key not in _LOADED:
            rid, rhash = describe_reward_model(spec, rm_id)
            if Path(spec).is_dir():
                _LOADED[key] = RewardModel(rid, rhash, spec, _sequence_classifier(spec, device), takes_messages=True)
            else:
                module_name, _, func_name = spec.partition(":")
                _LOADED[key] = RewardModel(rid, rhash, spec, getattr(importlib.import_module(module_name), func_name))
        return _LOADED[key]


def release_reward_models() -> None:
    """Drop every loaded reward model (before training, say) and return its memory to the device."""
    with _LOCK:
        _LOADED.clear()
    free_memory()


def _sequence_classifier(folder: str, device: str | None) -> Callable[[list[tuple[str, str]]], list[float]]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).to(dev).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise RewardError(f"reward model {folder}: cannot load a sequence-classification model "
                          f"({str(e).splitlines()[0][:160]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"  # too long: drop the start of the prompt, never the completion
    if model.config.num_labels != 1:
        raise RewardError(f"reward model {folder}: expected one output logit, the model has {model.config.num_labels}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    @torch.inference_mode()
    def score_batch(pairs: list[tuple[str, str]]) -> list[float]:
        enc = reward_model_inputs(tokenizer, pairs).to(dev)
        return model(**enc).logits[:, 0].float().cpu().tolist()

    return score_batch


def reward_model_inputs(tokenizer, pairs: list[tuple[str | list[dict], str]]):
    """The exchanges as the RM was trained to see them: a chat prompt's own messages (system and
    earlier turns included) plus the reply, through the RM tokenizer's chat template. A template
    writes its own BOS, so the tokenizer adds none then (else Llama- or Mistral-style RMs see two)."""
    def text(prompt: str | list[dict], completion: str) -> str:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        return "\n".join(m["content"] for m in messages) + completion

    return tokenizer([text(p, c) for p, c in pairs], padding=True, truncation=True, return_tensors="pt",
                     add_special_tokens=not tokenizer.chat_template)


def score_pairs(score_batch: Callable, pairs: list[tuple[str, str]], batch_size: int,
                sort_by_length: bool = True, name: str = "reward model") -> list[float]:
    """Rewards in input order, computed in micro-batches of similar length. Whatever the reward
    model raises or returns that is not one real number per pair is a RewardError naming it."""
    order = list(range(len(pairs)))
    if sort_by_length:
        order.sort(key=lambda i: _chars(pairs[i][0]) + len(pairs[i][1]))
    rewards: list[float] = [math.nan] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, r in zip(idx, _call(score_batch, [pairs[i] for i in idx], name)):
            rewards[i] = r
    return rewards


def _chars(prompt: str | list[dict]) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def _call(score_batch: Callable, batch: list[tuple[str, str]], name: str) -> list[float]:
    try:
        out = score_batch(batch)
    except Exception as e:  # the user's code: any failure is theirs to fix, and deterministic
        if out_of_memory(e):  # the device's, not the code's: the CLI names the batch size to lower
            raise
        raise RewardError(f"{name} raised {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
    if isinstance(out, str | bytes) or not hasattr(out, "__len__"):
        raise RewardError(f"{name} returned {type(out).__name__}, not a list of {len(batch)} numbers")
    out = list(out)
    if len(out) != len(batch):
        raise RewardError(f"{name} returned {len(out)} rewards for a batch of {len(batch)}")
    return [_real(x, name) for x in out]


def _real(x, name: str) -> float:
    """A reward as a float: Python and numpy reals, 0-d tensors; never a bool or a string."""
    if hasattr(x, "item") and not isinstance(x, numbers.Real):
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise RewardError(f"{name} returned {x!r:.40} ({type(x).__name__}); rewards must be real numbers")
    return float(x)


def check_finite(rewards, describe: Callable[[int], str]) -> None:
    """Raise RewardError(describe(i)) for the first NaN or infinite reward: never a number that
    reaches the weights or a loss."""
    for i, r in enumerate(rewards):
        if not math.isfinite(r):
            raise RewardError(describe(i))


def shard_rows(store_root: Path, candidates: dict, prompt_files: list[str]) -> list[dict]:
    """A candidates shard joined with its prompts' text, read from Parquet alone: workers never
    open the catalog (only the driver does, and DuckDB allows one writer process)."""
    cands = pq.read_table(store_root / candidates["path"], columns=["candidate_id", "prompt_id", "round", "completion"])
    wanted = pc.unique(cands.column("prompt_id"))
    prompts = {}
    for f in prompt_files:
        p = pq.read_table(store_root / f, columns=["prompt_id", "prompt", "messages"])
        p = p.filter(pc.is_in(p.column("prompt_id"), value_set=wanted))
        prompts.update((r["prompt_id"], r) for r in p.to_pylist())
    return [{**row, "prompt": prompts[row["prompt_id"]]["prompt"],
             "messages": json.loads(prompts[row["prompt_id"]]["messages"] or "null")} for row in cands.to_pylist()]


def reward_inputs(rm: RewardModel, rows: list[dict]) -> list[tuple]:
    """What the reward model scores: (messages or prompt text, completion) per row."""
    return [(r["messages"] if rm.takes_messages and r["messages"] else r["prompt"], r["completion"]) for r in rows]


def score_shard(store_root: str, candidates: dict, prompt_files: list[str], spec: str, rm_id: str | None,
                batch_size: int = 32, device: str | None = None) -> dict:
    """Score one registered candidates shard; write the scores shard atomically, return its manifest."""
    store = Store(store_root)
    rm = load_reward_model(spec, rm_id, device)
    rows = shard_rows(store.root, candidates, prompt_files)
    rewards = score_pairs(rm.score_batch, reward_inputs(rm, rows), batch_size,
                          name=f"reward model {rm.rm_id} ({spec})")
    check_finite(rewards, lambda i: f"reward model {rm.rm_id} ({spec}) returned {rewards[i]} for candidate "
                 f"{rows[i]['candidate_id']} (prompt {rows[i]['prompt_id']}, shard {candidates['path']}); nothing was written")
    table = pa.Table.from_pylist(
        [{"candidate_id": r["candidate_id"], "prompt_id": r["prompt_id"], "round": r["round"],
          "rm_id": rm.rm_id, "rm_hash": rm.rm_hash, "reward": x} for r, x in zip(rows, rewards)],
        schema=schema.SCORES,
    )
    round_ = candidates["round"]
    shard_id = f"{candidates['shard_id']}-{rm.rm_id}"
    out = store.root / "scores" / f"round={round_}" / f"rm={rm.rm_id}" / f"shard={candidates['shard_id']}.parquet"
    write_parquet_atomic(table, out)
    return shard_manifest(store.root, out, "scores", shard_id, round=round_, rm_id=rm.rm_id, rm_hash=rm.rm_hash)


def try_reward_model(store_root: str, candidates: dict, prompt_files: list[str], spec: str, rm_id: str,
                     device: str | None = None, rows: int = 2) -> None:
    """Score the first `rows` candidates of a shard: a reward model that raises, returns the wrong
    shape or type, or a non-finite number fails here, once, before any shard is fanned out."""
    rm = load_reward_model(spec, rm_id, device)
    sample = shard_rows(Path(store_root), candidates, prompt_files)[:rows]
    rewards = score_pairs(rm.score_batch, reward_inputs(rm, sample), rows,
                          name=f"reward model {rm.rm_id} ({spec})")
    check_finite(rewards, lambda i: f"reward model {rm.rm_id} ({spec}) returned {rewards[i]} for candidate "
                 f"{sample[i]['candidate_id']} (shard {candidates['path']}); nothing was written")


def plan_scoring(store: Store, round_: int, rm_id: str) -> list[dict]:
    """Candidates shards of a round that have no scores shard for this reward model yet."""
    done = {m["shard_id"] for m in store.registered_shards("scores", round_, rm_id)}
    return [m for m in store.registered_shards("candidates", round_) if f"{m['shard_id']}-{rm_id}" not in done]
