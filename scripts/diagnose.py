#!/usr/bin/env python
"""High-norm artifact diagnostics of a ViT, optionally raw vs SiNGER-refined teacher vs student. The command lives in singer_hf/commands/diagnose.py (also `singer-diagnose`)."""

from singer_hf.commands.diagnose import cli

cli()
