"""The generator's weights under `bf16-autocast`, three ways, each generating the same tokens and log A
bit for bit (tests/bond_data/backends/test_hf_weights.py):

- `fp32 (inference_mode)`: every weight fp32, decoding under `torch.inference_mode`, as the
  transformers backend ran before: autocast caches no cast there, so every forward (each decoding
  step) casts every linear layer's weight to bf16 again;
- `fp32`: every weight fp32 under `no_grad`: autocast casts each weight once per batch and keeps
  the casts for it (what the backend does with fp32 weights now: the online trainer's live policy);
- `bf16-body`: the body's linear layers held in bf16 (`precision.bf16_body`): what the generate
  stage loads now; nothing left to cast.

Two parts:
- measured here: one process per way of holding the weights (the CPU emulating the CUDA policy),
  each loading a model of `--shape` built in code, its weights copied as `.to(device)` copies them
  to a GPU, and generating under bf16 autocast; its anonymous resident memory after loading and its
  peak while generating, above what the process held before loading (sampled every 5 ms; glibc's
  mmap threshold pinned so that freed tensors leave the process);
- the accounting for the README's shapes (trainer/memory.py's): GiB of weights one generating GPU
  holds during a batch, fp32 + autocast's casts against bf16 linear layers + fp32 rest.

    python bench/generate_memory.py                       # Qwen2-0.5B's shape, 8 rows x 8 new tokens
    python bench/generate_memory.py --shape qwen2-tiny    # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # gpu_generate: the same models built in code and word-level tokenizer
GIB, MIB = 1024 ** 3, 1024 ** 2


def rss() -> int:
    """This process's anonymous resident memory in bytes (Linux; file pages, such as a safetensors
    file mapped while loading, left out)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def child(folder: str, held: str, rows: int, new_tokens: int) -> dict:
    """One way of holding the weights, in a fresh process: bytes above the start, after loading and at
    the peak of generation."""
    import contextlib

    import torch
    from gpu_generate import load_backend

    from bond_data.backends.base import PromptJob, Sampling

    start = rss()
    backend = load_backend(Path(folder), "cpu", batch_size=rows, precision="bf16-autocast" if held == "bf16-body" else None)
    with torch.no_grad():  # what .to("cuda") gives a GPU: fresh tensors, not views of the mapped file (autocast
        for p in backend.model.parameters():  # caches casts of those only: views would be cast at every step)
            p.data = p.data.clone()
    loaded = rss()
    peak = [loaded]
    running = True

    def watch():
        while running:
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    jobs = [PromptJob("0", " ".join(f"w{i + 3}" for i in range(24)), None, list(range(rows)), list(range(rows)))]
    t = time.perf_counter()
    with torch.inference_mode() if held == "fp32 (inference_mode)" else contextlib.nullcontext():  # the old decode
        out = backend.generate(jobs, Sampling(max_new_tokens=new_tokens, precision="bf16-autocast"))
    seconds = time.perf_counter() - t
    running = False
    thread.join()
    weights = sum(p.numel() * p.element_size() for p in backend.model.parameters())
    return {"held": held, "weights": weights, "loaded": loaded - start, "peak": max(peak[0], rss()) - start,
            "seconds": seconds, "tokens": [c.token_ids for c in out[0]], "log_a": [c.anchor_logprob for c in out[0]],
            "torch": torch.__version__}


def generator_bytes(config) -> dict[str, int]:
    """Weight bytes one generating device holds during a batch under bf16-autocast, both ways
    (parameters counted on a meta-device model; tied weights once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
                 for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "fp32": 4 * total + 2 * linear, "bf16-body": 2 * linear + 4 * (total - linear)}


def accounting_table() -> str:
    from trainer.memory import SHAPES, config_of

    header = ("| model | params | fp32 weights, cast at each step (before) | fp32 weights + the batch's casts "
              "| bf16 linear layers + fp32 rest (now) |")
    lines = [header, "|---|---:|---:|---:|---:|"]
    for name in SHAPES:
        b = generator_bytes(config_of(name))
        lines.append(f"| {name} | {b['params'] / 1e9:.2f}B | {4 * b['params'] / GIB:.1f} GiB | {b['fp32'] / GIB:.1f} GiB "
                     f"| **{b['bf16-body'] / GIB:.1f} GiB** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2-0.5b", help="a shape of bench/gpu_generate.py")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "HELD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.rows, args.new_tokens)))
        return
    from gpu_generate import SHAPES, build

    folder = Path(tempfile.mkdtemp()) / args.shape
    build(folder, args.shape)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")]))}
    runs = {}
    for held in ("fp32 (inference_mode)", "fp32", "bf16-body"):
        out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--new-tokens", str(args.new_tokens),
                              "--child", str(folder), held], env=env, capture_output=True, text=True, check=True)
        runs[held] = json.loads(out.stdout.strip().splitlines()[-1])
    config_class, size = SHAPES[args.shape]
    expected = generator_bytes(config_class(**size))
    expected["fp32 (inference_mode)"] = expected["params"] * 4  # no casts kept: one layer's at a time
    print(f"{args.shape} on the CPU, torch {runs['fp32']['torch']}, bf16 autocast, {args.rows} rows x "
          f"{args.new_tokens} new tokens; MiB above the process before loading:")
    for held, r in runs.items():
        print(f"{held:>21}: weights {r['weights'] / MIB:,.0f} MiB; resident after loading {r['loaded'] / MIB:,.0f} MiB, "
              f"peak while generating {r['peak'] / MIB:,.0f} MiB (accounting: weights + casts "
              f"{expected[held] / MIB:,.0f} MiB); {r['seconds']:.2f} s")
    b = runs["bf16-body"]
    for held in ("fp32 (inference_mode)", "fp32"):
        a = runs[held]
        same = a["tokens"] == b["tokens"] and a["log_a"] == b["log_a"]
        print(f"bf16-body against {held}: peak {a['peak'] / b['peak']:.2f}x lower, after loading "
              f"{a['loaded'] / b['loaded']:.2f}x lower, {a['seconds'] / b['seconds']:.2f}x faster; "
              f"same tokens and log A: {same}")
    print("\nGiB of weights one generating GPU holds during a batch under bf16-autocast (the KV cache and activations "
          "come on top):\n" + accounting_table())


if __name__ == "__main__":
    main()
