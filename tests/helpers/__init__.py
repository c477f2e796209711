"""What several test modules share: op cases against the reference, the CUDA emulation, the benchmark
scripts loaded as modules, and a tiny trainer run."""
