#!/usr/bin/env python
"""Linear probes on a frozen ViT (docs/method.md §8): classification, semantic segmentation, depth. The command lives in singer_hf/commands/evaluate.py (also `singer-evaluate`)."""

from singer_hf.commands.evaluate import cli

cli()
