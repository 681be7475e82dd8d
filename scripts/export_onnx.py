#!/usr/bin/env python
"""Export a distilled student to ONNX (dynamic batch axis) and check it against PyTorch. The command lives in singer_hf/commands/export_onnx.py (also `singer-export`)."""

from singer_hf.commands.export_onnx import cli

cli()
