"""What sample.py and sample_ddp.py stand on, one concern a module (docs/ARCHITECTURE.md, "Who owns what")."""
