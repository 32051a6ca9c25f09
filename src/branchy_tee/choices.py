"""Names the command line offers as choices. Kept free of heavy imports so that building the
parser (``--help``, ``key-broker``) does not load torch."""

DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
OPTIMIZERS = ("sgd", "adam", "adamw")
DISTILL = ("final", "teacher", "none")
CRITERIA = ("entropy", "maxprob")
