"""Small helpers shared by tests (tests/ is on sys.path, see conftest.py)."""

import json


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
