"""The training options' names, kept free of heavy imports so that ``--help`` does not load torch."""

DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
OPTIMIZERS = ("sgd", "adam", "adamw")
DISTILL = ("final", "teacher", "none")
