"""Objectives: one module per method family (dino, simclr, clip) plus annotation bootstrapping."""
