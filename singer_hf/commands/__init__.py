"""The command-line programs, each a `main(argv)` and its console script (`cli`): `singer-evaluate`,
`singer-diagnose`, `singer-push`, `singer-export`; `scripts/<name>.py` runs the same. Training is
scripts/distill.py."""
