"""`python -m torch.distributed.run ... crash_train.py CRASH_AT --store ...`: trainer.train's main,
but the CRASH_AT-th call of train_step raises (a simulated crash in a multi-process run)."""

import sys

from testutil import crashing
from trainer import train as train_mod

train_mod.train_step = crashing(train_mod.train_step, at=int(sys.argv.pop(1)), error=SystemExit(3))
train_mod.main()
