"""Arrow schemas of every table the store writes: defined once, used by writers and readers alike.

Identity is content and position, never time: `prompt_id` hashes the prompt's text or messages,
`candidate_id` and the sampling seed hash (round, prompt_id, sample index). A re-run reproduces the
same ids, so a shard written twice holds the same rows.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))  # a chat: [{role, content}]

PROMPTS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),  # sha256 of the canonical content, 16 hex
        pa.field("prompt", pa.string(), nullable=False),  # plain text; chat prompts: "role: content" lines
        pa.field("messages", pa.string()),  # chat prompts: JSON list of {role, content}; else null
        pa.field("source", pa.string(), nullable=False),  # file the prompt came from
    ]
)

CANDIDATES = pa.schema(
    [
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),  # generated ids, EOS included
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" (EOS) or "length"
        # log A(y): the anchor's log-probability of the completion at temperature 1 (what the
        # trainer's backward term divides by); `sample_logprob` is under the actual sampler.
        pa.field("anchor_logprob", pa.float64(), nullable=False),
        pa.field("sample_logprob", pa.float64(), nullable=False),
        pa.field("anchor_hash", pa.string(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("sampling", pa.string(), nullable=False),  # JSON: temperature, top_p, max_new_tokens
        pa.field("seed", pa.int64(), nullable=False),
    ]
)

SCORES = pa.schema(
    [
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("rm_id", pa.string(), nullable=False),
        pa.field("rm_hash", pa.string(), nullable=False),
        pa.field("reward", pa.float64(), nullable=False),
    ]
)

DATASET = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("messages", MESSAGES),  # a chat prompt's turns (the prompts table keeps them as JSON text)
        pa.field("completion", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),  # the completion as generated
        pa.field("reward", pa.float64(), nullable=False),
        pa.field("p_lt", pa.float64(), nullable=False),
        pa.field("p_le", pa.float64(), nullable=False),
        pa.field("bon_weight", pa.float64(), nullable=False),  # w_i of the chosen weighting; w_i / k sums to 1 per prompt
        pa.field("bon_weight_pool", pa.float64(), nullable=False),  # the pool weighting: never 0 (the backward term's log)
        pa.field("anchor_logprob", pa.float64(), nullable=False),
        pa.field("target_logprob", pa.float64(), nullable=False),  # log A of the target: anchor, or the sampler
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("rm_id", pa.string(), nullable=False),
        pa.field("anchor_hash", pa.string(), nullable=False),  # the anchor that sampled it (its tokenizer made token_ids)
    ]
)


def sha256_hex(data: str | bytes, length: int = 16) -> str:
    """Short hex digest: 16 hex chars (64 bits) is plenty for ids within one store."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:length]


def prompt_id(prompt: str | None, messages: list[dict] | None) -> str:
    """Content hash of a prompt; plain text and chat messages never collide (tagged)."""
    if messages is not None:
        canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], sort_keys=True)
        return sha256_hex("chat\0" + canonical)
    return sha256_hex("text\0" + str(prompt))


def candidate_id(round_: int, prompt_id_: str, sample_index: int) -> str:
    return sha256_hex(f"cand\0{round_}\0{prompt_id_}\0{sample_index}")


def seed63(*parts: object) -> int:
    """A 63-bit seed hashed from its parts (joined by NUL): a pure function of identity, so a sample
    never depends on time, batching or which worker drew it. Every sampling seed comes from here."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def candidate_seed(round_: int, prompt_id_: str, sample_index: int) -> int:
    """The sampling seed of one candidate: a hash of (round, prompt_id, sample index)."""
    return seed63("seed", round_, prompt_id_, sample_index)


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
