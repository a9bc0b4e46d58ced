"""Shared test settings."""
import os

import torch

# The tests run many small ops; on small, shared CI machines one intra-op thread is both
# faster and far more stable than several threads spinning against each other.
torch.set_num_threads(1)

# The timeout of every subprocess a test starts: a hang guard, not a speed check. It is far
# beyond the slowest honest run (the quick claims table, minutes on 2 quiet cores, many times
# that on a loaded machine), so that only a process that never ends trips it.
HANG_GUARD_S = 3600


def signal_after_step(monkeypatch, sig, step: int = 3) -> None:
    """Make the training loop send this process ``sig`` right after it logs update ``step``, as a
    scheduler's SIGTERM or a user's Ctrl-C would arrive mid-run."""
    from infra import runtime
    real = runtime.Logger.step

    def step_then_signal(self, s, *a, **k):
        real(self, s, *a, **k)
        if s == step:
            os.kill(os.getpid(), sig)
    monkeypatch.setattr(runtime.Logger, "step", step_then_signal)
