"""The dataset card: a Hugging Face `DatasetCard` (README.md with YAML metadata) beside the data.

The YAML holds what the Hub and `datasets.load_dataset(folder)` read: `configs` (data files relative
to the dataset folder, so the folder loads wherever it is copied), `dataset_info` (the features of the
Arrow schema, the split's size), `size_categories` and `license`; and under `bond` the provenance a
user needs to train on the rows correctly: the anchor that sampled them (hash and path) and its
tokenizer (the `token_ids` are that tokenizer's), the sampling settings and backend, the reward model
(id and hash), n, k, the weighting and target, the store and round. The body explains the columns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa

SIZE_CATEGORIES = ["n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                   "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T"]

BODY = """# BOND distillation dataset `{dataset_id}`

Every candidate of round {round} of the store, weighted towards the Best-of-{n} distribution of the
round's {target_name} under reward model `{rm_id}` (hash `{rm_hash_short}`). Weighting: **{weighting}**.

- `bon_weight`: {formula} Within a prompt `bon_weight / k` sums to 1, so
  `sum_i bon_weight_i * loss_i / k` is the Best-of-{n} expectation (the trainer's forward term).
- `bon_weight_pool` = (p_le^n - p_lt^n) / (p_le - p_lt) (BOND Theorem 1 on the pool: Best-of-{n} drawn
  with replacement from the pool). Never 0, so the trainer's backward term takes its log.
- `p_lt`, `p_le`: fraction of the prompt's pool with a smaller / smaller-or-equal reward.
- `messages`: a chat prompt as a list of `{{role, content}}` (null for a plain-text `prompt`).
- `token_ids`: the completion as generated, in the anchor's tokenizer (`{tokenizer}`).
- `anchor_logprob`: log-probability of the completion under the anchor (temperature 1).
- `target_logprob`: log-probability under the policy whose Best-of-{n} is the target ({target_column}):
  the trainer's log A.

A plain SFT trainer (TRL's `SFTTrainer` included) ignores `bon_weight` and trains on the anchor's own
samples: weight each example's loss by it (the BOND repository's README has a TRL recipe).

| | |
|---|---|
| weighting | {weighting} |
| target | {target} |
| prompts | {prompts} |
| candidates | {candidates} |
| samples per prompt (k) | {k_min} to {k_max} |
| tie rate | {tie_rate:.3f} |
| effective sample size per prompt (mean) | {ess_mean:.2f} |
| mean reward: one sample / Best-of-{n} | {mean_reward:.4f} / {bon_reward:.4f} |

## Provenance

| | |
|---|---|
| store, round | `{store}`, round {round} |
| anchor | `{anchor_path}` (hash `{anchor_hash}`) |
| tokenizer | `{tokenizer}`; special tokens {special_tokens} |
| sampling | {sampling} (backend {backends}) |
| reward model | `{rm_id}` (`{rm_spec}`, hash `{rm_hash}`) |

## Load it

{load}
"""

LOAD = {
    "parquet": '```python\nimport datasets\nds = datasets.load_dataset("path/to/this/folder", split="train")\n```',
    "arrow": '```python\nimport datasets\nds = datasets.load_from_disk("path/to/this/folder")\n```',
}
DATA_FILES = {"parquet": "part-*.parquet", "arrow": "data-*.arrow"}


def size_category(num_rows: int) -> str:
    """The Hub's size bucket of a row count (n<1K, 1K<n<10K, ...)."""
    if num_rows < 1000:
        return SIZE_CATEGORIES[0]
    return SIZE_CATEGORIES[min(int(math.log10(num_rows)) - 2, len(SIZE_CATEGORIES) - 1)]


def dataset_info(schema: pa.Schema, num_rows: int, num_bytes: int) -> dict:
    """The card's `dataset_info`: the features of the Arrow schema (as `datasets` writes them) and the
    train split's size."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo

    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_examples=num_rows, num_bytes=num_bytes))
    info = DatasetInfo(features=Features.from_arrow_schema(schema), splits=splits, dataset_size=num_bytes)
    return info._to_yaml_dict()  # the YAML form datasets itself writes to cards (push_to_hub)


def tokenizer_provenance(anchor_path: str) -> dict:
    """The tokenizer saved with the anchor: its name or path and its special tokens."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(anchor_path)
    except (OSError, ValueError) as e:  # an anchor moved or deleted since it was registered
        return {"name_or_path": anchor_path, "special_tokens": {}, "error": " ".join(str(e).split())[:200]}
    special = {name: getattr(tok, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(tok, name, None) is not None}
    return {"name_or_path": tok.name_or_path, "class": type(tok).__name__, "vocab_size": len(tok),
            "special_tokens": special, "chat_template": bool(getattr(tok, "chat_template", None))}


def write_card(folder: Path, fmt: str, schema: pa.Schema, num_rows: int, num_bytes: int, meta: dict,
               license: str) -> Path:
    """README.md in `folder`: YAML metadata (configs, dataset_info, size, license, provenance) and the
    body. `meta` holds the dataset's summary and provenance (`card_meta`'s keys)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        license=license, size_categories=[size_category(num_rows)], tags=["bond", "best-of-n", "distillation"],
        pretty_name=f"BOND Best-of-{meta['n']} dataset {meta['dataset_id']}",
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES[fmt]}]}],
        dataset_info=dataset_info(schema, num_rows, num_bytes), bond=meta["provenance"])
    p, tok = meta["provenance"], meta["provenance"]["tokenizer"]
    body = BODY.format(
        **meta, **meta["summary"], rm_hash=p["rm_hash"], rm_hash_short=p["rm_hash"][:16], rm_spec=p["rm_spec"],
        store=p["store"], anchor_path=p["anchor_path"], anchor_hash=p["anchor_hash"], tokenizer=tok["name_or_path"],
        special_tokens=", ".join(f"{k} `{v}`" for k, v in tok["special_tokens"].items()) or "none",
        sampling="; ".join(json.dumps(s, sort_keys=True) for s in p["sampling"]), backends=", ".join(p["backends"]),
        load=LOAD[fmt])
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = folder / "README.md"
    card.save(path)
    return path
