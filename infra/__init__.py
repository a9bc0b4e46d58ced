"""What a training run needs besides the method: settings -> data set and model (builders),
distributed setup, logging, signals and sample grids (runtime), atomic checkpoints without pickle
(checkpoints), TensorBoard / W&B (trackers), and the finished model in diffusers' layout (export)."""
