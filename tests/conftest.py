"""Shared test settings."""
import torch

# The tests run many small ops; on small, shared CI machines one intra-op thread is both
# faster and far more stable than several threads spinning against each other.
torch.set_num_threads(1)
