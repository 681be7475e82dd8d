"""Publishing a distilled student: the card from the run's records, the dry-run folder, and the upload.

Uploads go to `StandInHub`, a small HTTP server on 127.0.0.1 that stands in for the Hugging Face
Hub: it implements the endpoints `huggingface_hub` calls for `whoami`, `create_repo`, `create_branch`,
`upload_folder` (validate-yaml, preupload, the LFS batch API and its basic upload, commit) and
`repo_info`, and records every request. It is a stand-in, not the Hub: safetensors files go through
LFS as on the Hub, but with the basic transfer (the tests switch off Xet, huggingface_hub's default
when hf_xet is installed, whose storage protocol the stand-in does not implement), and it does not
check metadata the way the Hub does (the tests check the card's YAML with huggingface_hub itself).
"""

import base64
import hashlib
import importlib.util
import io
import json
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import datasets
import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from conftest import IMAGE, make_vit
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from singer_hf.cli import run_cli
from singer_hf.publishing import PublishError, publish_student

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_" + "s3cr3t" * 6
STUDENT = "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64"
ARTIFACT_FILES = ["artifacts/artifact_stats.json", "artifacts/norm_histograms.png", "artifacts/patch_norms.png"]
"""A run's artifact statistics and figures (`--artifact_stats`, the default): published with the student, shown in its card."""


def load_script(name):
    """The command behind `scripts/<name>.py` (a module of singer_hf.commands), as a test calls its main(argv)."""
    return importlib.import_module(f"singer_hf.commands.{name}")


# -- the stand-in Hub ------------------------------------------------------------------------------
def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class StandInHub(ThreadingHTTPServer):
    """Stand-in for the Hub's HTTP API (see the module doc): repos of branches of files."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), StandInHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests = []  # (method, path with query, headers, body)
        self.repos = {}  # repo_id -> {branch: {"files": {path: bytes}, "commits": [(oid, summary)]}}
        self.refused_tokens = set()
        self.failing_repos = set()  # their uploads get HTTP 503, as during an outage
        self.lfs = {}  # sha256 -> bytes, uploaded through the LFS basic transfer

    def commits(self, repo_id, branch="main"):
        return self.repos[repo_id][branch]["commits"]

    def files(self, repo_id, branch="main"):
        return self.repos[repo_id][branch]["files"]


class StandInHandler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def _handle(self, method):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if self.headers.get("Authorization", "").removeprefix("Bearer ") in self.server.refused_tokens:
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        parts = [unquote(part) for part in urlparse(self.path).path.strip("/").split("/")]
        route = (method, *parts[:2])
        if route == ("POST", "api", "repos"):  # /api/repos/create
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or 'me'}/{payload['name']}"
            if repo_id in self.server.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo_id}"})
            self.server.repos[repo_id] = {"main": {"files": {}, "commits": [("0" * 40, "initial commit")]}}
            return self._reply(200, {"url": f"{self.server.url}/{repo_id}"})
        if route == ("GET", "api", "whoami-v2"):
            return self._reply(200, {"type": "user", "name": "me"})
        if route == ("POST", "api", "validate-yaml"):
            return self._reply(200, {"errors": [], "warnings": []})
        if parts[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":  # /{repo}.git/info/lfs/objects/batch
            objects = [
                {"oid": o["oid"], "size": o["size"]}
                | ({} if o["oid"] in self.server.lfs else {"actions": {"upload": {"href": f"{self.server.url}/lfs-upload/{o['oid']}"}}})
                for o in json.loads(body)["objects"]
            ]
            return self._reply(200, {"transfer": "basic", "objects": objects})
        if parts[0] == "lfs-upload" and method == "PUT":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self._reply(400, {"error": "sha256 mismatch"})
            self.server.lfs[parts[1]] = body
            return self._reply(200, {})
        if parts[:2] != ["api", "models"] or len(parts) < 6:
            return self._reply(404, {"error": f"not implemented by the stand-in: {method} {self.path}"})
        repo_id, action, branch = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
        if repo_id in self.server.failing_repos:
            return self._reply(503, {"error": "Service temporarily unavailable"})
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self._reply(404, {"error": "Repository not found"})
        if action == "branch" and method == "POST":
            if branch in repo:
                return self._reply(409, {"error": "Reference already exists"})
            repo[branch] = {"files": dict(repo["main"]["files"]), "commits": list(repo["main"]["commits"])}
            return self._reply(200, {})
        if branch not in repo:
            return self._reply(404, {"error": "Revision not found"})
        state = repo[branch]
        if action == "preupload" and method == "POST":
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["path"].endswith(".safetensors")  # as the Hub's default .gitattributes
                stored = state["files"].get(f["path"])
                oid = None if stored is None else hashlib.sha256(stored).hexdigest() if lfs else git_blob_sha1(stored)
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
            return self._reply(200, {"files": files})
        if action == "commit" and method == "POST":
            lines = [json.loads(line) for line in body.decode().splitlines() if line]
            header = next(line["value"] for line in lines if line["key"] == "header")
            for line in lines:
                if line["key"] == "file":
                    state["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] == "lfsFile" and line["value"]["oid"] in self.server.lfs:
                    state["files"][line["value"]["path"]] = self.server.lfs[line["value"]["oid"]]
                elif line["key"] != "header":
                    return self._reply(400, {"error": f"the stand-in cannot apply {line}"})
            oid = hashlib.sha1(body).hexdigest()
            state["commits"].append((oid, header["summary"]))
            return self._reply(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{oid}", "commitOid": oid})
        if action == "revision" and method == "GET":
            return self._reply(200, {"id": repo_id, "sha": state["commits"][-1][0], "siblings": []})
        return self._reply(404, {"error": f"not implemented by the stand-in: {method} {self.path}"})

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def hub():
    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def on_hub(hub, monkeypatch):
    """huggingface_hub talks to the stand-in (HF_ENDPOINT, read at import, is patched where it landed)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # LFS basic transfer (module doc)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


# -- a real run folder -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    make_vit(seed=0).save_pretrained(root / "teacher")
    transformers.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "teacher")
    ModelCard("---\nlicense: mit\n---\n# A teacher with a card\n").save(root / "teacher" / "README.md")
    rng = np.random.default_rng(0)
    images = []
    for _ in range(16):
        buffer = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    datasets.Dataset.from_dict({"img": images}).cast_column("img", datasets.Image()).to_parquet(str(root / "data.parquet"))
    figures = root / "figures"
    figures.mkdir()
    PIL.Image.new("RGB", (8, 8)).save(figures / "token_norms.png")
    (figures / "notes.txt").write_text("not a figure")
    return root


@pytest.fixture(scope="module")
def pushed_run(workspace, hub):
    """scripts/distill.py with --push_to_hub, against the stand-in: the run folder every test reads."""
    output = workspace / "vit-tiny-singer"
    argv = [
        "--teacher_name_or_path", str(workspace / "teacher"), "--student_size", "tiny",
        "--student_config_overrides", STUDENT, "--dataset_name", str(workspace / "data.parquet"),
        "--image_column", "img", "--output_dir", str(output), "--per_device_train_batch_size", "8",
        "--rank", "4", "--max_steps", "2", "--logging_steps", "1", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true",
        "--push_to_hub", "true", "--hub_model_id", "me/vit-tiny-singer", "--hub_token", TOKEN,
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        patch.delenv("HF_TOKEN", raising=False)  # the token comes from --hub_token here
        load_script("distill").main(argv)
    return output


def write_results(path, backbone, accuracy, rmse):
    path.write_text(json.dumps({
        "schema": "singer-hf/probe-results", "schema_version": 1,
        "backbone": {"name_or_path": backbone, "model_type": "vit", "feature": "hidden_states[4], block 3 before the final norm",
                     "num_parameters": 47328},
        "seed": 0, "wall_time_s": 12.5, "singer_hf_version": "0.1.0",
        "results": [
            {"task": "image-classification",
             "dataset": {"name": "zalando-datasets/fashion_mnist", "config": None, "split": "test", "revision": None, "num_examples": 10000},
             "metrics": [{"type": "accuracy", "name": "Top-1 accuracy (linear probe)", "value": accuracy, "unit": "%"}],
             "settings": {"head": "linear on CLS", "epochs": 3, "batch_size": 64, "lrs": [0.5], "selected_lr": 0.5}},
            {"task": "depth-estimation",
             "dataset": {"name": "sayakpaul/nyu_depth_v2", "config": None, "split": "validation", "revision": None, "num_examples": 654},
             "metrics": [{"type": "rmse", "name": "RMSE", "value": rmse, "unit": "m"}],
             "settings": {"head": "1x1 conv", "epochs": 2}},
        ],
    }))  # fmt: skip
    return path


def fingerprint(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


# -- tests ---------------------------------------------------------------------------------------------
def test_distill_push_to_hub_publishes_our_layout_once_with_the_token_in_the_header_only(pushed_run, hub):
    commits = hub.commits("me/vit-tiny-singer")
    assert len(commits) == 2  # the repo's initial commit and ours: the Trainer pushed nothing of its own
    assert commits[-1][1] == "Upload SiNGER student distilled from teacher, 2 steps"
    files = hub.files("me/vit-tiny-singer")
    assert sorted(files) == ["README.md", *ARTIFACT_FILES, "config.json", "model.safetensors", "preprocessor_config.json"]
    assert files["model.safetensors"] == (pushed_run / "model.safetensors").read_bytes()
    assert ModelCard(files["README.md"].decode()).data.pipeline_tag == "image-feature-extraction"
    uploads = [r for r in hub.requests if r[1].startswith(("/api/whoami-v2", "/api/repos/", "/api/models/", "/api/validate-yaml", "/me/"))]
    assert [r[1] for r in uploads if r[1] != "/api/validate-yaml"] == [
        "/api/whoami-v2",  # checked before training: the token, the Hub and the repo
        "/api/repos/create",
        "/api/repos/create",  # the upload itself (exist_ok)
        "/api/models/me/vit-tiny-singer/preupload/main",
        "/me/vit-tiny-singer.git/info/lfs/objects/batch",
        "/api/models/me/vit-tiny-singer/commit/main",
    ]
    assert [r[0] for r in hub.requests if r[1].startswith("/lfs-upload/")] == ["PUT"]  # model.safetensors, once
    # The token goes in the Authorization header of every API call, and nowhere else (huggingface_hub
    # also fetches a registry without it, and the LFS upload URL, a storage URL on the Hub, gets none).
    for method, path, headers, body in hub.requests:
        assert headers.get("authorization") == f"Bearer {TOKEN}" or (method, path, headers, body) not in uploads
        others = {k: v for k, v in headers.items() if k != "authorization"}
        assert TOKEN not in path and TOKEN not in json.dumps(others) and TOKEN.encode() not in body
    assert not any(TOKEN.encode() in path.read_bytes() for path in pushed_run.rglob("*") if path.is_file())


def test_rerun_with_identical_files_makes_no_commit(pushed_run, on_hub):
    before = len(on_hub.commits("me/vit-tiny-singer"))
    result = publish_student(pushed_run, "me/vit-tiny-singer")
    assert len(on_hub.commits("me/vit-tiny-singer")) == before
    assert result.commit_url.endswith(on_hub.commits("me/vit-tiny-singer")[-1][0])  # the existing head


def test_card_from_the_run_records_with_results_and_model_index(pushed_run, workspace, tmp_path):
    results = write_results(tmp_path / "results.json", "vit-tiny-singer", 71.25, 1.02)
    teacher = write_results(tmp_path / "teacher.json", "teacher", 80.5, 0.95)
    staged = tmp_path / "upload"
    load_script("push_to_hub").main([
        str(pushed_run), "--repo_id", "me/vit-tiny-singer", "--results", str(results),
        "--baseline_results", str(teacher), "--figures", str(workspace / "figures"), "--dry_run", str(staged),
    ])  # fmt: skip
    card = ModelCard.load(staged / "README.md")
    metadata = metadata_load(staged / "README.md")
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-feature-extraction"
    assert {"singer", "knowledge-distillation", "vision-transformer", "image-feature-extraction"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # a local teacher: no Hub id to point at
    # model-index: parses back into the EvalResults of results.json, and survives huggingface_hub's round trip
    name, evals = model_index_to_eval_results(metadata["model-index"])
    assert name == "vit-tiny-singer"
    assert [(e.task_type, e.dataset_type, e.dataset_split, e.metric_type, e.metric_value) for e in evals] == [
        ("image-classification", "zalando-datasets/fashion_mnist", "test", "accuracy", 71.25),
        ("depth-estimation", "sayakpaul/nyu_depth_v2", "validation", "rmse", 1.02),
    ]
    assert eval_results_to_model_index(name, evals) == metadata["model-index"]
    assert len(card.data.eval_results) == 2
    text = card.text
    assert "| image-classification | zalando-datasets/fashion_mnist, test | Top-1 accuracy (linear probe) (%) | 71.25 | 80.5 |" in text
    assert "| depth-estimation | sayakpaul/nyu_depth_v2, validation | RMSE (m) ↓ | 1.02 | 0.95 |" in text
    # the training budget, from trainer_state.json and the run record
    state = json.loads((pushed_run / "trainer_state.json").read_text())
    runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    assert "| Optimisation steps | 2 |" in text and "| Images seen (steps × global batch) | 16 |" in text
    assert "| Global batch | 8 (1 × 8 × 1 accumulation) |" in text and "| Hardware | 1 × CPU, fp32 |" in text
    assert f"| Wall time (training loop, last session) | {runtime:.1f} s |" in text
    assert "| learning_rate | 0.001 |" in text and "| Adapter rank | 4 |" in text
    # teacher blocks [4, 5] → student blocks [2, 3] of 4: the distilled feature is the last block's
    assert "| 5 | 3 | final |" in text and "outputs.hidden_states[-1]" in text
    assert 'repo = "me/vit-tiny-singer"' in text and "![token norms](figures/token_norms.png)" in text
    assert "## The `distillation/` folder" not in text  # not published unless asked
    assert "@inproceedings{yu2026singer" in text


def test_dry_run_folder_loads_without_singer_hf_and_holds_no_pickles_or_local_paths(pushed_run, workspace, tmp_path):
    (pushed_run / "checkpoint-1").mkdir(exist_ok=True)  # what a run folder may hold besides the student
    (pushed_run / "checkpoint-1" / "model.safetensors").write_bytes(b"not published")
    (pushed_run / "training_args.bin").write_bytes(b"\x80\x04 a pickle, never published")
    staged = tmp_path / "upload"
    result = publish_student(
        pushed_run, "me/vit-tiny-singer", include_distillation=True, figures_dir=workspace / "figures", dry_run=staged
    )
    assert result.files == [
        "README.md", *ARTIFACT_FILES, "config.json", "distillation/adapter_config.json", "distillation/adapter_model.safetensors",
        "distillation/distillation_config.json", "distillation/heads.safetensors", "distillation/run_record.json",
        "figures/token_norms.png", "model.safetensors", "preprocessor_config.json",
    ]  # fmt: skip
    assert result.files == sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert "## The `distillation/` folder" in (staged / "README.md").read_text()
    for name in result.files:
        data = (staged / name).read_bytes()
        assert not data.startswith(b"\x80") and not name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))
        assert str(workspace).encode() not in data and str(Path.home()).encode() + b"/" not in data
    adapter = json.loads((staged / "distillation" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "teacher"  # was the absolute local path of the teacher
    code = (
        "import sys, torch\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        f"folder = {str(staged)!r}\n"
        "processor = AutoImageProcessor.from_pretrained(folder)\n"
        "model = AutoModel.from_pretrained(folder).eval()\n"
        "pixels = processor(images=[__import__('PIL.Image').Image.new('RGB', (40, 40), (200, 30, 90))], return_tensors='pt').pixel_values\n"
        "with torch.no_grad():\n"
        "    print(model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1].double().sum().item())\n"
        "assert not any(name.startswith('singer_hf') for name in sys.modules), 'singer_hf was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    student = transformers.AutoModel.from_pretrained(pushed_run).eval()
    pixels = transformers.AutoImageProcessor.from_pretrained(pushed_run)(
        images=[PIL.Image.new("RGB", (40, 40), (200, 30, 90))], return_tensors="pt"
    ).pixel_values
    with torch.no_grad():
        expected = student(pixel_values=pixels, output_hidden_states=True).hidden_states[-1].double().sum().item()
    assert float(out.stdout.split()[-1]) == pytest.approx(expected, rel=1e-6)


def test_card_says_what_the_student_is_its_terms_and_how_to_read_the_distilled_feature(pushed_run, tmp_path):
    import re

    from safetensors import safe_open

    from singer_hf.modeling import DistillationModelConfig

    text = (pushed_run / "README.md").read_text()  # as scripts/distill.py wrote it: no license given
    assert "license" not in metadata_load(pushed_run / "README.md")
    assert "No license is declared for this student" in text and "| Teacher `teacher` | `mit` |" in text
    staged = tmp_path / "upload"
    publish_student(pushed_run, "me/vit-tiny-singer", license="apache-2.0", dry_run=staged)
    text = (staged / "README.md").read_text()
    assert metadata_load(staged / "README.md")["license"] == "apache-2.0"
    assert "Published under `apache-2.0`" in text and "its terms follow theirs" in text
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == (
        "# ViT student (4 blocks, width 32, patch 8) distilled from `teacher` with SiNGER"
    )
    for argument in ("overwrite_output_dir", "save_safetensors", "max_nonfinite_steps", "hub_model_id", "push_to_hub"):
        assert f"| {argument} |" not in text  # not hyperparameters
    # The configuration shown has the weights used, the same as the settings table.
    shown = json.loads(re.search(r"distillation_config.json</code>.*?```json\n(.*?)```", text, re.S)[1])
    weights = DistillationModelConfig(method="singer").weights()
    assert {k: shown[k] for k in ("kd_weight", "outlier_weight", "info_weight")} == {
        "kd_weight": weights["kd"], "outlier_weight": weights["outlier"], "info_weight": weights["info"]
    }  # fmt: skip
    assert f"| Loss weights | KD {weights['kd']:g}, outlier {weights['outlier']:g}, information {weights['info']:g} |" in text
    assert "Blocks are numbered from 0 throughout this card" in text and "last block (block 3)" in text
    with safe_open(staged / "model.safetensors", "pt") as saved:  # distillation trains no pooler: it ships zeroed
        poolers = [name for name in saved.keys() if "pooler" in name]
        assert poolers and all(not saved.get_tensor(name).any() for name in poolers)
    assert "saved with its pooler zeroed" in text

    # The card's two snippets, run as a user would, without singer_hf: no load warnings; the first gives
    # the distilled feature, the pipeline gives it through the final norm, as the card says.
    usage, pipe = re.findall(r"```python\n(.*?)```", text, re.S)[:2]
    PIL.Image.new("RGB", (40, 40), (200, 30, 90)).save(tmp_path / "example.jpg")
    code = usage.replace('"me/vit-tiny-singer"', repr(str(staged))) + pipe + (
        "torch.save({'features': features, 'tokens': tokens}, 'out.pt')\n"
        "import sys; assert not any(name.startswith('singer_hf') for name in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOAD REPORT" not in out.stderr and "MISSING" not in out.stderr, out.stderr[-2000:]
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    student = transformers.AutoModel.from_pretrained(staged).eval()
    pixels = transformers.AutoImageProcessor.from_pretrained(staged)(
        images=PIL.Image.open(tmp_path / "example.jpg").convert("RGB"), return_tensors="pt"
    ).pixel_values
    layers = json.loads((pushed_run / "distillation" / "distillation_config.json").read_text())["student_layers"]
    with torch.no_grad():
        outputs = student(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(result["features"], outputs.hidden_states[layers[-1] + 1])
    torch.testing.assert_close(result["tokens"], outputs.last_hidden_state)
    standardised = result["tokens"].float()
    torch.testing.assert_close(standardised.mean(-1), torch.zeros(standardised.shape[:2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardised.var(-1, unbiased=False), torch.ones(standardised.shape[:2]), atol=1e-3, rtol=0)


def test_script_pushes_results_figures_and_distillation_to_a_branch(pushed_run, workspace, on_hub, tmp_path):
    results = write_results(tmp_path / "results.json", "vit-tiny-singer", 71.25, 1.02)
    argv = [str(pushed_run), "--repo_id", "me/vit-tiny-singer", "--revision", "with-results", "--results", str(results),
            "--figures", str(workspace / "figures"), "--include_distillation", "true", "--commit_message", "Add probe results"]  # fmt: skip
    load_script("push_to_hub").main(argv)
    assert on_hub.commits("me/vit-tiny-singer", "with-results")[-1][1] == "Add probe results"
    files = on_hub.files("me/vit-tiny-singer", "with-results")
    assert {"distillation/heads.safetensors", "distillation/adapter_model.safetensors", "figures/token_norms.png"} <= set(files)
    assert "model-index" in metadata_load_text(files["README.md"])
    assert "distillation/heads.safetensors" not in on_hub.files("me/vit-tiny-singer")  # main is untouched


def metadata_load_text(readme: bytes) -> dict:
    return ModelCard(readme.decode()).data.to_dict()


def test_unreachable_hub_is_one_line_and_a_rerun_succeeds(pushed_run, on_hub, monkeypatch, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    before = fingerprint(pushed_run)
    argv = [str(pushed_run), "--repo_id", "me/elsewhere"]
    with monkeypatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
        with pytest.raises(SystemExit) as exit_info:
            load_script("push_to_hub").main(argv)
    message = str(exit_info.value.code)
    assert message == (
        f"error: cannot reach the Hub at http://127.0.0.1:{closed} (ConnectError); "
        "nothing was changed locally: re-run the same command to retry"
    )
    assert fingerprint(pushed_run) == before
    load_script("push_to_hub").main(argv)  # the Hub is back: the same command succeeds
    assert sorted(on_hub.files("me/elsewhere")) == ["README.md", *ARTIFACT_FILES, "config.json", "model.safetensors", "preprocessor_config.json"]
    assert TOKEN not in capsys.readouterr().out


def test_refused_token_is_one_line_without_the_token(pushed_run, on_hub, monkeypatch):
    bad = "hf_" + "bad" * 12
    on_hub.refused_tokens.add(bad)
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(PublishError) as error:
        publish_student(pushed_run, "me/refused")
    message = str(error.value)
    assert "\n" not in message and bad not in message
    assert message.startswith("the Hub refused the upload to me/refused: HTTP 401 ") and "re-run the same command" in message


@pytest.mark.parametrize(
    "change, message",
    [
        ({"run_dir": "missing"}, "run_dir: .*missing holds no saved student"),
        ({"results": "bad_schema"}, r"results: .*bad.json is not a singer-hf/probe-results file of version 1"),
        ({"figures_dir": "teacher"}, "figures: .*teacher holds no images"),
        ({"dry_run": "teacher"}, "dry_run: .*teacher is not empty"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(pushed_run, workspace, tmp_path, change, message):
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "something-else", "results": []}))
    kwargs = {"dry_run": tmp_path / "upload"}
    for name, value in change.items():
        kwargs[name] = {"missing": tmp_path / "missing", "bad_schema": tmp_path / "bad.json", "teacher": workspace / "teacher"}[value]
    run_dir = kwargs.pop("run_dir", pushed_run)
    with pytest.raises(ValueError, match=message):
        publish_student(run_dir, "me/x", **kwargs)
    assert not (tmp_path / "upload").exists()


def test_the_card_renders_from_an_installed_wheel(pushed_run, tmp_path):
    """The template is package data: a wheel install (no checkout around) renders the card."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(ROOT / "singer_hf", source / "singer_hf", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)], check=True)
    (wheel,) = (tmp_path / "wheel").glob("singer_hf-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    code = (
        "import singer_hf.model_card as card\n"
        f"assert card.__file__.startswith({str(tmp_path / 'site')!r}), card.__file__\n"
        f"card.student_card_from_run({str(pushed_run)!r}, 'rendered', repo_id='me/from-wheel')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    text = (tmp_path / "rendered" / "README.md").read_text()
    assert ModelCard(text).data.pipeline_tag == "image-feature-extraction"
    assert "### Training budget" in text and 'repo = "me/from-wheel"' in text
    assert "outputs.hidden_states[-1]" in text


# -- --push_to_hub checked before training -------------------------------------------------------------
def _distill_argv(workspace, output, repo_id, *extra):
    return [
        "--teacher_name_or_path", str(workspace / "teacher"), "--student_size", "tiny",
        "--student_config_overrides", STUDENT, "--dataset_name", str(workspace / "data.parquet"),
        "--image_column", "img", "--output_dir", str(output), "--per_device_train_batch_size", "8",
        "--rank", "4", "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--push_to_hub", "true", "--hub_model_id", repo_id, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("problem", ["no token", "Hub unreachable", "token refused", "not a repo id"])
def test_push_to_hub_problems_stop_the_run_before_training(workspace, on_hub, tmp_path, monkeypatch, capsys, problem):
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    repo_id, expected = "me/checked-first", None
    if problem == "no token":
        monkeypatch.delenv("HF_TOKEN")
        expected = "push_to_hub: no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was trained"
    elif problem == "Hub unreachable":
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
        expected = f"push_to_hub: cannot reach the Hub at http://127.0.0.1:{closed} (ConnectError); nothing was trained"
    elif problem == "token refused":
        refused = "hf_" + "gone" * 9
        on_hub.refused_tokens.add(refused)
        monkeypatch.setenv("HF_TOKEN", refused)
        expected = "push_to_hub: the Hub refused me/checked-first: HTTP 401 "
    else:
        repo_id = "me/not a name"
        expected = "hub_model_id: 'me/not a name' is not a Hub repo id"
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(load_script("distill").main, _distill_argv(workspace, output, repo_id))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert not output.exists()  # nothing trained, nothing written


def test_a_failed_upload_after_training_prints_the_command_that_publishes_the_run(workspace, on_hub, tmp_path, capsys):
    output = tmp_path / "run"
    on_hub.failing_repos.add("me/outage")  # answers the checks before training, fails the upload after it
    with pytest.raises(SystemExit) as exit_info:
        load_script("distill").main(_distill_argv(workspace, output, "me/outage"))
    error, command = capsys.readouterr().err.strip().splitlines()[-2:]
    assert exit_info.value.code == 1 and (output / "model.safetensors").is_file()
    assert error.startswith("error: the Hub refused the upload to me/outage: HTTP 503 ")
    assert error.endswith(f"the student is saved in {output}, nothing was published. Publish it with:")
    command = shlex.split(command)
    assert command[0] == "python" and Path(command[1]).resolve() == ROOT / "scripts" / "push_to_hub.py"
    assert command[2:] == [str(output), "--repo_id", "me/outage"]
    on_hub.failing_repos.clear()
    load_script("push_to_hub").main(command[2:])  # the Hub is back: that command publishes the finished run
    assert sorted(on_hub.files("me/outage")) == ["README.md", *ARTIFACT_FILES, "config.json", "model.safetensors", "preprocessor_config.json"]
