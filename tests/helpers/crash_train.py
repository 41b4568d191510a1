"""`python -m torch.distributed.run ... crash_train.py CRASH_AT --store ...`: trainer.train's main,
but the CRASH_AT-th call of train_step raises (a simulated crash in a multi-process run)."""

import sys

from trainer import train as train_mod

crash_at, calls = int(sys.argv.pop(1)), {"n": 0}
real_step = train_mod.train_step


def crashing_step(*args, **kw):
    calls["n"] += 1
    if calls["n"] == crash_at:
        raise SystemExit(3)
    return real_step(*args, **kw)


train_mod.train_step = crashing_step
train_mod.main()
