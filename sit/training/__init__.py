"""Training SiT: train.py's library, one concern per module (docs/ARCHITECTURE.md lists them)."""
