"""The embedded default: align the cached, deliberately misaligned digits base with SSPO.

Used when train.py gets no --config. Sized for 2 CPU cores: a few minutes end to end.
"""

CONFIG = dict(
    model="digits",
    data="digits",
    method="sspo",
    beta=500.0,          # per-value mean error over 64 pixels (sspo.py, "Beta convention"); swept in research
    lr=3e-4,             # best of {1e-4, 3e-4, 1e-3} for SSPO in a small sweep (digits-research branch)
    batch_size=32,
    max_steps=300,
    save_every=25,       # a checkpoint every 25 updates; also K (replay_every 0 follows it)
    loser_steps=10,      # DDIM steps per replayed sample
    loser_guidance=3.0,
    cfg_drop=0.1,
    log_every=10,
    sample_every=100,
    # the sample grids: one prompt per digit, in the first training template
    validation_prompts="|".join(f"a handwritten digit {w}" for w in
                                ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")),
    out_dir="runs/digits_sspo",
    overwrite=True,      # re-running the README's command starts over (use --resume to continue)
)
