"""Everything that writes results/, each script named after what it writes; nothing else in the
repository imports it. Run from the repository root as ``python -m research.NAME``:
benchmark (claims, sweep, loser-sampling frontier and the README's default-run table on digits),
bench (speed and memory ratios), pair_weights, data_reading, memory_sdxl, memory_video."""
