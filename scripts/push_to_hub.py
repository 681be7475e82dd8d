#!/usr/bin/env python
"""Publish a distilled student to the Hugging Face Hub, with a model card rendered from its run. The command lives in singer_hf/commands/push_to_hub.py (also `singer-push`)."""

from singer_hf.commands.push_to_hub import cli

cli()
