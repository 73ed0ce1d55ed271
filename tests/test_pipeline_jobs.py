"""Every ``python -m pipeline ...`` command line in jobs/, the README and the Makefile composes a valid
config (and builds its models on the meta device); the job scripts are valid shell and YAML."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import meta_parameter_count

from pipeline.config import COMMANDS, compose, validate
from pipeline.orchestrate import plan

ROOT = Path(__file__).resolve().parent.parent
JOB_FILES = sorted(p for p in (ROOT / "jobs").rglob("*") if p.is_file())
SOURCES = [*JOB_FILES, ROOT / "README.md", ROOT / "Makefile"]
SHELL_END = {"&", "&&", ";", "|", "||", ")", ">", ">>", "2>&1"}
# What the scripts and the README expect in the environment (values as a cluster would have them).
ENVIRONMENT = {
    "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    "DINO_O365_ROOT": "/data/o365",
    "DINO_COCO_ROOT": "/data/coco",
    "DINO_WEIGHTS_DIR": "/data/weights",
}


def _substitute(text: str, defaults: dict[str, str]) -> str:
    """Shell variables with a default in the script (``X=${X:-value}``) become that value, the others
    absolute placeholder paths; optional expansions (``${X:+...}``, ``"$@"``, ``"${ARRAY[@]}"``) become
    nothing: they add optional overrides, never required ones."""
    for name, value in defaults.items():
        text = text.replace(f"${{{name}}}", value)
    text = re.sub(r'"?\$\{\w+:\+[^}]*\}"?', "", text)
    text = re.sub(r'"?\$\{\w+\[@\]\}"?|"\$@"', "", text)
    text = re.sub(
        r"\$\{(\w+)\}|\$(\w+)|\$\((\w+)\)", lambda m: "/" + (m.group(1) or m.group(2) or m.group(3)), text
    )
    return text


def command_lines(path: Path) -> list[tuple[str, list[str]]]:
    """``(command, overrides)`` of every ``-m pipeline <command> ...`` in a file (continuation lines joined,
    a sweep's ``k=a,b`` reduced to its first value)."""
    text = path.read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}$", text, re.M))
    found = []
    for line in text.splitlines():
        for match in re.finditer(r"-m pipeline (.*)", line):
            rest = match.group(1).split("`")[0]  # markdown inline code ends the command
            tokens = shlex.split(_substitute(rest, defaults), comments=True)
            if not tokens or tokens[0] not in COMMANDS:
                continue
            args = []
            for token in tokens[1:]:
                if token in SHELL_END:
                    break
                if token in ("--multirun", "-m") or token.startswith("["):
                    continue
                key, _, value = token.partition("=")
                if "," in value and not value.startswith(("[", "{", "'", '"')):
                    value = value.split(",")[0]
                args.append(f"{key}={value}" if _ else token)
            found.append((tokens[0], args))
    return found


def _unique_command_lines() -> list:
    seen: dict[tuple[str, tuple[str, ...]], str] = {}
    for path in SOURCES:
        for i, (command, args) in enumerate(command_lines(path)):
            seen.setdefault((command, tuple(args)), f"{path.relative_to(ROOT)}:{i}:{command}")
    return [pytest.param(command, list(args), id=where) for (command, args), where in seen.items()]


COMMAND_LINES = _unique_command_lines()


def test_the_job_scripts_and_the_readme_hold_the_stage_commands() -> None:
    by_file = {p.relative_to(ROOT).as_posix(): {c for c, _ in command_lines(p)} for p in SOURCES}
    assert by_file["jobs/slurm/pretrain_swinl_o365.sbatch"] == {"pretrain"}
    assert by_file["jobs/slurm/finetune_swinl_coco.sbatch"] == {"finetune"}
    assert by_file["jobs/ray/submit.sh"] == {"run"}
    assert by_file["jobs/k8s/rayjob.yaml"] == {"run"}
    assert by_file["Makefile"] == {"run"}
    assert {"run", "shard", "pretrain", "finetune", "eval", "predict"} <= by_file["README.md"]


@pytest.mark.parametrize(("command", "args"), COMMAND_LINES)
def test_every_documented_command_line_composes_and_validates(
    command: str, args: list[str], monkeypatch
) -> None:
    for key, value in ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    config = validate(compose(command, args))
    if command == "run":
        models = [s.config.model for s in plan(config) if getattr(s.config, "model", None) is not None]
    else:
        models = [m for m in [getattr(config, "model", None)] if m is not None]
    for model in models:
        assert meta_parameter_count(model) > 0


@pytest.mark.parametrize(
    "path", [p for p in JOB_FILES if p.suffix in (".sh", ".sbatch")], ids=lambda p: p.name
)
def test_job_scripts_are_valid_bash(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert path.stat().st_mode & 0o111, f"{path} is not executable"


@pytest.mark.parametrize("path", [p for p in JOB_FILES if p.suffix == ".yaml"], ids=lambda p: p.name)
def test_job_yaml_parses(path: Path) -> None:
    assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize(
    ("name", "nodes"), [("pretrain_swinl_o365.sbatch", 8), ("finetune_swinl_coco.sbatch", 2)]
)
def test_slurm_training_jobs_requeue_on_preemption_and_before_the_time_limit(name: str, nodes: int) -> None:
    text = (ROOT / "jobs" / "slurm" / name).read_text()
    assert f"#SBATCH --nodes={nodes}" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    assert "trap requeue USR1" in text and 'scontrol requeue "${SLURM_JOB_ID}"' in text
    # The ranks run in the background so the batch shell can take the signal.
    assert re.search(r"srun .*&\nwait \$!", text.replace("\\\n", " "))
    assert "--nproc_per_node 8" in text


def test_the_rayjob_and_cluster_config_name_the_pinned_ray() -> None:
    rayjob = yaml.safe_load((ROOT / "jobs" / "k8s" / "rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and rayjob["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    assert "ray.address=auto" in rayjob["spec"]["entrypoint"]
    cluster = yaml.safe_load((ROOT / "jobs" / "ray" / "cluster.yaml").read_text())
    assert cluster["max_workers"] == len(cluster["provider"]["worker_ips"])
    assert "ray==2.60.0" in (ROOT / "constraints.txt").read_text()
