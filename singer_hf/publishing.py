"""Publish a distilled student to the Hugging Face Hub: our folder layout and card, in one commit.

`publish_student` copies what a user of the student needs out of a run folder (config,
safetensors weights, image processor; the run's `artifacts/` statistics and figures, which its card
shows; `distillation/` only when asked; figures when given) into a
staging folder, renders the card there from the run's records (`model_card.student_card_from_run`),
and uploads that folder with `HfApi.upload_folder`, one commit. Nothing else of the run folder
(checkpoints, logs, trainer state, pickles) is ever uploaded, and JSON files lose any absolute local
path on the way.

The run folder is only read: when the Hub cannot be reached or refuses the token, `PublishError`
says so in one line and the same call can simply be repeated. `check_publishable` asks the Hub the
same questions before a run that publishes at its end, so that it fails before training, not after. A repeat with identical files makes
no commit: `create_commit` compares each file with the Hub's copy (the hashes the preupload
endpoint returns) and skips the commit when nothing changed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

try:  # the HTTP client of huggingface_hub: httpx2 from huggingface_hub 2 on, httpx before
    from httpx2 import HTTPError as ClientError
except ImportError:
    from httpx import HTTPError as ClientError

from .evaluation.results import SCHEMA, SCHEMA_VERSION
from .layout import ARTIFACT_FIGURES, ARTIFACT_STATS_FILE, ARTIFACTS_DIR, CONFIG_FILE, DISTILLATION_DIR, HEADS_FILE, RUN_RECORD, check_not_group, distilled_teachers
from .locations import without_local_paths
from .methods import method_label
from .model_card import student_card_from_run, trainer_state_file

STUDENT_FILES = ("config.json", "preprocessor_config.json", "model.safetensors.index.json")
"""Top-level files of a student folder that are published, with the `model*.safetensors` weights."""
DISTILLATION_FILES = ("adapter_config.json", "adapter_model.safetensors", HEADS_FILE, CONFIG_FILE, RUN_RECORD)
"""Files of `distillation/` published with `include_distillation`."""
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif", ".webp")
FIGURES_DIR = "figures"


class PublishError(RuntimeError):
    """The upload failed (Hub unreachable, token refused, ...): one line, the `reason` and that nothing
    changed locally, so that the same call can be repeated."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"{reason}; {_RETRY}")


@dataclass
class PublishResult:
    folder: Path | None
    """The staged folder: the dry run's folder; None after an upload (a temporary folder, removed)."""
    files: list[str]
    """Paths in the repository, sorted."""
    commit_url: str | None = None
    """The commit that holds the files (the existing head when nothing changed); None for a dry run."""


def publish_student(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    results: str | os.PathLike | None = None,
    baseline_results: list[str | os.PathLike] | tuple = (),
    figures_dir: str | os.PathLike | None = None,
    include_distillation: bool = False,
    license: str | None = None,
    commit_message: str | None = None,
    dry_run: str | os.PathLike | None = None,
) -> PublishResult:
    """Stage the student of `run_dir` with its card and upload it to `repo_id` in one commit.

    Args:
        run_dir: the `--output_dir` of scripts/distill.py (a saved student with its records).
        repo_id: the Hub repo (`user/name`; a bare name goes to the token's user).
        private: create the repo private (no effect on an existing repo).
        revision: a branch to commit to (created from main when missing); default main.
        token: a Hub token; default `HF_TOKEN` or the stored login. Never printed or written.
        results: the student's results.json (scripts/evaluate.py): results table and `model-index`.
        baseline_results: results.json files of the teacher and baselines, for the results table.
        figures_dir: a folder of images (png, jpg, svg, ...) shown in the card under `figures/`.
        include_distillation: also publish `distillation/` (adapters, projectors, configs).
        license: the card's `license` metadata.
        commit_message: default: what was distilled from what, and for how long.
        dry_run: write the exact folder that would be uploaded here, and upload nothing.

    Raises:
        ValueError: bad input (one line naming the argument), before anything is uploaded.
        PublishError: the upload failed; the run folder is untouched and the call can be repeated.
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    loaded_results = _load_results(results, "results") if results is not None else None
    loaded_baselines = [_load_results(path, "baseline_results") for path in baseline_results]
    figures = _figure_files(Path(figures_dir)) if figures_dir is not None else []
    if dry_run is not None:
        folder = Path(dry_run)
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"dry_run: {folder} is not empty; give a new or empty folder")
        files = _stage(run_dir, folder, repo_id, loaded_results, loaded_baselines, figures, include_distillation, license)
        return PublishResult(folder=folder, files=files)
    if token is None and get_token() is None:
        raise PublishError(_NO_TOKEN)
    with tempfile.TemporaryDirectory(prefix="singer-hf-publish-") as staging:
        files = _stage(run_dir, Path(staging), repo_id, loaded_results, loaded_baselines, figures, include_distillation, license)
        message = commit_message or _commit_message(run_dir)
        commit_url = _upload(Path(staging), repo_id, private=private, revision=revision, token=token, message=message)
    return PublishResult(folder=None, files=files, commit_url=commit_url)


# -- staging -----------------------------------------------------------------------------------------
def _check_run_dir(run_dir: Path) -> None:
    check_not_group(run_dir, "run_dir")
    if not (run_dir / "config.json").is_file() or not any(run_dir.glob("model*.safetensors")):
        raise ValueError(
            f"run_dir: {run_dir} holds no saved student (config.json and model.safetensors); "
            "give the --output_dir of a finished scripts/distill.py run"
        )
    if not (run_dir / DISTILLATION_DIR / RUN_RECORD).is_file():
        raise ValueError(
            f"run_dir: {run_dir} has no {DISTILLATION_DIR}/{RUN_RECORD} (written at the end of scripts/distill.py); "
            "was the run finished?"
        )


def _load_results(path: str | os.PathLike, argument: str) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{argument}: {path} does not exist; give a results.json of scripts/evaluate.py") from None
    except ValueError as error:
        raise ValueError(f"{argument}: {path} is not valid JSON ({error})") from None
    schema = (results.get("schema"), results.get("schema_version")) if isinstance(results, dict) else None
    if schema != (SCHEMA, SCHEMA_VERSION):
        raise ValueError(f"{argument}: {path} is not a {SCHEMA} file of version {SCHEMA_VERSION} (found {schema})")
    return results


def _figure_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"figures: {folder} is not a folder")
    figures = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in FIGURE_SUFFIXES)
    if not figures:
        raise ValueError(f"figures: {folder} holds no images ({', '.join(FIGURE_SUFFIXES)})")
    return figures


def _stage(
    run_dir: Path,
    folder: Path,
    repo_id: str,
    results: dict | None,
    baselines: list[dict],
    figures: list[Path],
    include_distillation: bool,
    license: str | None,
) -> list[str]:
    """Copy the published files of `run_dir` into `folder`, render the card there; list them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [name for name in STUDENT_FILES if (run_dir / name).is_file()]
    names += sorted(path.name for path in run_dir.glob("model*.safetensors"))
    if include_distillation:
        summary = json.loads((run_dir / DISTILLATION_DIR / CONFIG_FILE).read_text())
        for teacher in ("", *(f"{name}/" for name in distilled_teachers(summary) if name is not None)):  # several: a subfolder each
            names += [f"{DISTILLATION_DIR}/{teacher}{name}" for name in DISTILLATION_FILES if (run_dir / DISTILLATION_DIR / teacher / name).is_file()]
    names += [f"{ARTIFACTS_DIR}/{name}" for name in (ARTIFACT_STATS_FILE, *ARTIFACT_FIGURES) if (run_dir / ARTIFACTS_DIR / name).is_file()]
    for name in names:
        _copy(run_dir / name, folder / name)
    for figure in figures:
        shutil.copyfile(figure, _target(folder / FIGURES_DIR / figure.name))
    student_card_from_run(
        run_dir,
        folder,
        repo_id=repo_id,
        license=license,
        results=results,
        baseline_results=baselines,
        figures=[f"{FIGURES_DIR}/{figure.name}" for figure in figures],
        distillation_included=include_distillation,
    )
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    _check_no_local_paths(folder, files, run_dir)
    return files


def _target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _copy(source: Path, target: Path) -> None:
    """Copy a file; a JSON file loses its absolute local paths (e.g. a PEFT adapter's base model)."""
    if source.suffix == ".json":
        content = without_local_paths(json.loads(source.read_text()))
        _target(target).write_text(json.dumps(content, indent=2) + "\n")
    else:
        shutil.copyfile(source, _target(target))


def _check_no_local_paths(folder: Path, files: list[str], run_dir: Path) -> None:
    """A last guard: no text file to be published names the run's local folders."""
    local = {str(run_dir.resolve()), os.path.expanduser("~") + os.sep}
    for name in files:
        if name.endswith((".json", ".md")):
            text = (folder / name).read_text()
            leaked = sorted(path for path in local if path not in (os.sep, "") and path in text)
            if leaked:
                raise ValueError(f"run_dir: {name} would publish the local path {leaked[0]}; nothing was uploaded")


def _commit_message(run_dir: Path) -> str:
    record = json.loads((run_dir / DISTILLATION_DIR / RUN_RECORD).read_text())
    method = json.loads((run_dir / DISTILLATION_DIR / CONFIG_FILE).read_text()).get("method", "singer")
    steps, state_file = "", trainer_state_file(run_dir, record)
    if state_file.is_file():
        steps = f", {json.loads(state_file.read_text()).get('global_step', 0):,} steps"
    teachers = [teacher["name"] for teacher in record["teachers"].values()] if "teachers" in record else [record["teacher"]["name"]]
    return f"Upload {method_label(method)} student distilled from {' and '.join(teachers)}{steps}"


# -- upload ------------------------------------------------------------------------------------------
def check_publishable(repo_id: str, *, token: str | None = None, private: bool | None = None) -> str:
    """What `publish_student` needs from the Hub, asked before a run that publishes at its end: a token, a
    valid `repo_id`, a Hub that answers and accepts the token (`whoami`), and the repo (created now when
    missing, as the upload would). Returns the repo's full id (a bare name goes to the token's user).

    Raises:
        ValueError: `repo_id` is not a repo id.
        PublishError: what is missing or refused, in one line (`reason`).
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a Hub repo id ({str(error).splitlines()[0]}); give user/name") from None
    if token is None and get_token() is None:
        raise PublishError(_NO_TOKEN)
    api = HfApi(token=token)
    with _hub_errors(api, repo_id):
        api.whoami()
        return api.create_repo(repo_id, private=private, exist_ok=True).repo_id


def _upload(folder: Path, repo_id: str, *, private: bool | None, revision: str | None, token: str | None, message: str) -> str:
    api = HfApi(token=token)
    with _hub_errors(api, repo_id, "the upload to "):
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, revision=revision, commit_message=message)
    return commit.commit_url


@contextmanager
def _hub_errors(api: HfApi, repo_id: str, what: str = ""):
    """The Hub's refusals and network failures as one-line `PublishError`s, without the token."""
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        reason = (error.server_message or str(error)).strip().splitlines()[0]
        hint = " (is the token valid, with write access to the repo?)" if status in (401, 403) else ""
        raise PublishError(f"the Hub refused {what}{repo_id}: HTTP {status} {reason}{hint}") from None
    except (ClientError, OSError) as error:
        raise PublishError(f"cannot reach the Hub at {api.endpoint} ({type(error).__name__})") from None


_NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"
_RETRY = "nothing was changed locally: re-run the same command to retry"
