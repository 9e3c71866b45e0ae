"""The toy world (issue 4): a procedural image world with exact ground truth (world.py), a judge CNN that reads
the ground truth back from images (judge.py), and the pretraining of a tiny SD1 model on it (pretrain.py).
See docs/toyworld.md."""
