"""Built-in tasks: tiny models and verifiable rewards built in code, nothing downloaded.

    common.py   tokenizer, tiny Llama, pretraining loop, build-once cache, sampling statistics
    tiny.py     letter sorting: discrete edit-distance reward, many ties (the demo's task)
    digits.py   digit strings read as a fraction: a continuous reward, the exact Best-of-N law
"""

from pathlib import Path

_TASKS_DIR = Path(__file__).resolve().parent
# reward spec -> the held-out prompts the task ships (what `bond rounds` evaluates each anchor on)
HELD_OUT_PROMPTS = {"bond_data.tasks.tiny:reward": _TASKS_DIR / "tiny_eval_prompts.jsonl",
                    "bond_data.tasks.digits:reward": _TASKS_DIR / "digits_eval_prompts.jsonl"}
