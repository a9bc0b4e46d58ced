"""Shared test settings."""
import torch

# The tests run many small ops; on small, shared CI machines one intra-op thread is both
# faster and far more stable than several threads spinning against each other.
torch.set_num_threads(1)

# The timeout of every subprocess a test starts: a hang guard, not a speed check. It is far
# beyond the slowest honest run (the quick claims table, minutes on 2 quiet cores, many times
# that on a loaded machine), so that only a process that never ends trips it.
HANG_GUARD_S = 3600
