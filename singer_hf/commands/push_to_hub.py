"""Publish a distilled student to the Hugging Face Hub, with a model card rendered from its run.

    python scripts/push_to_hub.py runs/vit_l_to_vit_t_singer --repo_id me/vit-tiny-singer-from-vit-large \\
        --results runs/eval/results.json --baseline_results runs/eval_teacher/results.json --figures runs/figures
    python scripts/push_to_hub.py runs/demo --repo_id me/demo --dry_run /tmp/demo_upload   # stage and list only

One commit holds the student (config, safetensors, image processor), the card (README.md) and the
figures; `distillation/` (adapters, projectors, configs) only with --include_distillation. The
token comes from HF_TOKEN or the stored login (`hf auth login`) and is never printed. If the Hub
cannot be reached or refuses the token, the error is one line and the same command can be re-run;
a re-run with unchanged files makes no commit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from singer_hf.cli import StrictArgumentParser, run_cli


@dataclass
class PublishArguments:
    run_dir: str = field(metadata={"help": "The --output_dir of a finished scripts/distill.py run."})
    repo_id: str = field(metadata={"help": "Hub repo, user/name (a bare name goes to the token's user)."})
    private: bool | None = field(default=None, metadata={"help": "Create the repo private (no effect on an existing repo)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to (created when missing); default main."})
    results: str | None = field(default=None, metadata={"help": "The student's results.json (scripts/evaluate.py)."})
    baseline_results: list[str] = field(
        default_factory=list, metadata={"help": "results.json files of the teacher and baselines, compared in the card."}
    )
    figures: str | None = field(default=None, metadata={"help": "A folder of images to show in the card."})
    include_distillation: bool = field(default=False, metadata={"help": "Also publish distillation/ (adapters, projectors)."})
    license: str | None = field(default=None, metadata={"help": "The card's license (the teacher's and data's terms apply)."})
    commit_message: str | None = field(default=None, metadata={"help": "Default: what was distilled from what, how long."})
    dry_run: str | None = field(default=None, metadata={"help": "Write the folder that would be uploaded here; upload nothing."})


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-"):
        argv = ["--run_dir", *argv]  # the run folder, given first without its flag
    (args,) = StrictArgumentParser(PublishArguments).parse(argv)
    from singer_hf.publishing import PublishError, publish_student  # after the arguments: --help answers without torch

    try:
        published = publish_student(
            args.run_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            results=args.results,
            baseline_results=args.baseline_results,
            figures_dir=args.figures,
            include_distillation=args.include_distillation,
            license=args.license,
            commit_message=args.commit_message,
            dry_run=args.dry_run,
        )
    except (ValueError, PublishError) as error:
        raise SystemExit(f"error: {error}") from None
    if published.commit_url is None:
        print(f"Dry run: {len(published.files)} files in {published.folder} (nothing uploaded):")
    else:
        print(f"Published {len(published.files)} files: {published.commit_url}")
    print("\n".join(f"  {name}" for name in published.files))
    return published


def cli() -> None:
    """`singer-push` and `python scripts/push_to_hub.py`: `main` with its errors as one line (exit status 2)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
