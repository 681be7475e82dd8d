#!/usr/bin/env python
"""A run's logged artifact statistics over training, as a figure (one panel per distilled teacher block).

    python scripts/plot_artifact_history.py --run_dir outputs/demo/student --output docs/figures/demo_artifact_history.png

Reads `trainer_state.json` (written by scripts/distill.py with `--artifact_stats`, the default) and
plots `artifacts/<view>/<layer>/<statistic>` (`--statistics`) of the teacher, the refined teacher and the student
against the step.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from singer_hf.artifacts import STATISTICS
from singer_hf.cli import StrictArgumentParser, run_cli
from singer_hf.diagnostics import artifact_history_figure


@dataclass
class PlotArguments:
    run_dir: str = field(metadata={"help": "A scripts/distill.py output folder (holding trainer_state.json)."})
    output: str = field(metadata={"help": "The PNG file to write."})
    statistics: list[str] = field(
        default_factory=lambda: ["outlier_share"], metadata={"help": f"Any of {list(STATISTICS)}: one row of panels each."}
    )


def main(argv: list[str] | None = None) -> Path:
    (args,) = StrictArgumentParser(PlotArguments).parse(sys.argv[1:] if argv is None else argv)
    if unknown := [name for name in args.statistics if name not in STATISTICS]:
        raise ValueError(f"statistics: each must be one of {list(STATISTICS)}, got {unknown}")
    state = Path(args.run_dir) / "trainer_state.json"
    if not state.is_file():
        raise ValueError(f"run_dir: {args.run_dir} holds no trainer_state.json; give the --output_dir of a finished scripts/distill.py run")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    artifact_history_figure(json.loads(state.read_text())["log_history"], output, tuple(args.statistics))
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    run_cli(main)
