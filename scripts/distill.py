#!/usr/bin/env python
"""Distil a ViT teacher into a ViT student with SiNGER (or the FitNet / ViTKD baselines). The command lives in
singer_hf/commands/distill.py (also `singer-distill`); `--help` lists its arguments."""

from singer_hf.commands.distill_arguments import cli

cli()
