"""pebr-lightning: PeBR-R1 two-stage RL for vision-language models, as Lightning modules."""

__version__ = "0.1.0"
