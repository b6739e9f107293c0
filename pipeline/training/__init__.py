"""Training and evaluation of the tuner: ``imagetune train-tuner`` and ``imagetune eval-tuner``."""
