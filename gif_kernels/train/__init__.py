"""The reference trainer: `python -m gif_kernels.train` (see trainer.py), evaluation
(`python -m gif_kernels.train.evaluate`), data, backbones and the heads it compares."""
