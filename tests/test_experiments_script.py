"""scripts/experiments.sh: the Best-RQ and Paraformer comparisons as resumable stages, on tiny recipes.

The driver is what a later session starts and leaves running for hours, so its bookkeeping is checked end to
end with the real `streamer pretrain` / `streamer train` / `streamer eval`: every stage records its run
directory, the pretrained encoder reaches the fine-tuning run, the two fine-tuning runs differ only in that,
a stopped stage continues from its own run instead of starting over, a finished one is left alone, and
`eval` puts the finished runs side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_paraformer import _recipe as paraformer_recipe
from tests.test_pretrain import _pretrain_recipe
from tests.test_training import _recipe as tdt_recipe
from tests.test_training import corpus as corpus  # noqa: F401 - the tiny labelled corpus fixture

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "experiments.sh"

pytestmark = pytest.mark.slow


def _recipes(tmp_path: Path, corpus: Path) -> dict[str, str]:  # noqa: F811
    pre = _pretrain_recipe(corpus)
    pre["data"] = {"corpus_dir": str(corpus), "corpus_split": "train", "dev_clips": 2, "workers": 0,
                   "min_duration_s": 0.5}
    files = {
        "PRETRAIN_RECIPE": pre,
        "TDT_RECIPE": tdt_recipe(corpus, val_every_steps=2),
        "PARAFORMER_RECIPE": paraformer_recipe(corpus),
    }
    env = {}
    for key, recipe in files.items():
        path = tmp_path / f"{key.lower()}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        env[key] = str(path)
    return env


def _run(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def _env(tmp_path: Path, corpus: Path, **sizes: str) -> dict[str, str]:  # noqa: F811
    """The driver's environment: the tiny recipes, the corpus, a state folder, and the run sizes given."""
    return {**_recipes(tmp_path, corpus), "CORPUS": str(corpus), "STATE": str(tmp_path / "state"),
            "STREAMER_STATE__DIR": "", "FINETUNE_HOURS": "1", **sizes}


def _step(run: Path) -> int:
    return int(json.loads((run / "metrics.json").read_text())["step"])


def test_stages_record_their_runs_resume_and_compare(tmp_path: Path, corpus: Path) -> None:  # noqa: F811
    state = tmp_path / "state"
    env = _env(tmp_path, corpus, PRETRAIN_STEPS="4", FINETUNE_STEPS="4", PARAFORMER_STEPS="3", EVAL_LIMIT="4",
               EVAL_CONTEXT="4,1", EVAL_SPLITS="dev")
    assert "not started" in _run(env, "status").stdout

    done = _run(env, "bestrq")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {s: Path((state / f"{s}.run").read_text().strip())
            for s in ("bestrq-pretrain", "bestrq-finetune-pretrained", "bestrq-finetune-scratch")}
    assert len(set(runs.values())) == 3
    for stage, run in runs.items():
        assert run.parent == state / stage and (run / "checkpoints" / "best.pt").is_file()
    assert _step(runs["bestrq-pretrain"]) == 4
    # both fine-tuning runs: the same recipe and steps; only one starts from the pretrained encoder
    configs = {s: yaml.safe_load((runs[s] / "config.yaml").read_text()) for s in runs if "finetune" in s}
    pretrained, scratch = configs["bestrq-finetune-pretrained"], configs["bestrq-finetune-scratch"]
    assert pretrained["train"]["init_from"] == str(runs["bestrq-pretrain"] / "checkpoints" / "best.pt")
    assert scratch["train"]["init_from"] == ""
    assert pretrained["data"]["train_hours"] == scratch["data"]["train_hours"] == 1
    assert {k: v for k, v in pretrained["train"].items() if k != "init_from"} == {
        k: v for k, v in scratch["train"].items() if k != "init_from"}
    assert "loaded the pretrained encoder" in (runs["bestrq-finetune-pretrained"] / "train.log").read_text()
    assert "loaded the pretrained encoder" not in (runs["bestrq-finetune-scratch"] / "train.log").read_text()
    assert all(_step(runs[s]) == 4 for s in configs)

    # a second call starts nothing new: the finished stages are continued (and have nothing left to do)
    before = sorted(str(p.relative_to(state)) for p in state.glob("*/*"))
    again = _run(env, "bestrq")
    assert again.returncode == 0, again.stderr
    assert sorted(str(p.relative_to(state)) for p in state.glob("*/*")) == before
    assert again.stdout.count("continuing") == 3

    # the Paraformer stage, stopped with SIGTERM part way, continues its own run on the next call
    env_long = {**env, "PARAFORMER_STEPS": "60"}  # stopped after step 3, before its end
    proc = subprocess.Popen(["bash", str(SCRIPT), "paraformer"], env={**os.environ, **env_long},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    record = state / "paraformer.run"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (record.is_file() and record.read_text().strip()
                                               and (Path(record.read_text().strip()) / "train.log").is_file()
                                               and "step 3 " in (Path(record.read_text().strip()) / "train.log")
                                               .read_text()):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    stopped_output, _ = proc.communicate(timeout=60)
    deadline = time.monotonic() + 60  # the trainer saves latest.pt after the shell is gone: wait for the group
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the stopped stage's trainer did not exit within 60 s of SIGTERM")
    paraformer = Path(record.read_text().strip())
    stopped_at = _step(paraformer)
    assert 3 <= stopped_at < 60, stopped_output
    resumed = _run({**env, "PARAFORMER_STEPS": "3"}, "paraformer")  # the size of a recorded run cannot change
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing {paraformer}" in resumed.stdout
    assert (state / "paraformer.run").read_text().strip() == str(paraformer)
    assert _step(paraformer) > stopped_at  # it went on from where it stopped (its own max_steps: 60)

    status = _run(env, "status").stdout
    for stage in ("bestrq-pretrain", "bestrq-finetune-pretrained", "bestrq-finetune-scratch", "paraformer"):
        assert f"{stage}: {state}" in status

    table = _run(env, "eval", timeout=600)
    assert table.returncode == 0, table.stderr
    lines = [line for line in table.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| corpus | split | mode | bestrq-finetune-scratch | bestrq-finetune-pretrained | "
                               "paraformer |")
    assert any("| dev (" in line for line in lines[1:])
    assert {p.name for p in (state / "eval").glob("*.csv")} == {
        "bestrq-finetune-scratch.csv", "bestrq-finetune-pretrained.csv", "paraformer.csv"}
    # at equal steps: each run's latest.pt, exported, not its best.pt (which eval would read from the run)
    models = state / "eval" / "models"
    assert (models / "bestrq-finetune-scratch-latest" / "model.nemo").is_file()
    assert (models / "paraformer-latest" / "paraformer.json").is_file()
    assert json.loads((models / "paraformer-latest" / "training.json").read_text())["step"] == _step(paraformer)


def test_pairs_runs_the_four_stages_in_two_lanes_on_one_thread_each(tmp_path: Path, corpus: Path) -> None:  # noqa: F811
    state = tmp_path / "state"
    # pairs trains the Paraformer for the fine-tunes' steps and hours, whatever PARAFORMER_* say
    env = _env(tmp_path, corpus, PRETRAIN_STEPS="3", FINETUNE_STEPS="3", PARAFORMER_STEPS="50", PARAFORMER_HOURS="7")
    done = _run(env, "pairs")
    assert done.returncode == 0, done.stdout + done.stderr
    stages = ("bestrq-pretrain", "bestrq-finetune-scratch", "bestrq-finetune-pretrained", "paraformer")
    runs = {s: Path((state / f"{s}.run").read_text().strip()) for s in stages}
    for stage, run in runs.items():
        assert run.parent == state / stage, stage
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["train"]["threads"] == 1, stage
        assert _step(run) == 3, stage
        assert (run / "checkpoints" / "best.pt").is_file()
    for stage in stages[1:]:
        assert yaml.safe_load((runs[stage] / "config.yaml").read_text())["data"]["train_hours"] == 1
    # the pretrained fine-tune starts after the pretraining has finished, from its best checkpoint
    pretrained = yaml.safe_load((runs["bestrq-finetune-pretrained"] / "config.yaml").read_text())
    assert pretrained["train"]["init_from"] == str(runs["bestrq-pretrain"] / "checkpoints" / "best.pt")
    # each lane's second stage started once its first had ended
    for first, second in (("bestrq-pretrain", "bestrq-finetune-pretrained"), ("bestrq-finetune-scratch", "paraformer")):
        assert (runs[second] / "config.yaml").stat().st_mtime >= (runs[first] / "metrics.json").stat().st_mtime


def test_default_continues_the_base_model_and_prints_the_ship_table(tmp_path: Path, corpus: Path) -> None:  # noqa: F811
    data = tmp_path / "corpus"
    shutil.copytree(corpus, data)
    (data / "corpus.json").write_text("{}")  # a finished corpus: `default` makes none
    env = _env(tmp_path, data, FINETUNE_STEPS="3")
    made = _run(env, "bestrq-finetune-scratch")
    assert made.returncode == 0, made.stderr
    base = tmp_path / "base" / "model.nemo"  # the "shipped" model: a tiny run exported, training.json beside it
    exported = subprocess.run([sys.executable, "-m", "streamer", "export",
                               (tmp_path / "state" / "bestrq-finetune-scratch.run").read_text().strip(),
                               "--out", str(base)], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    base_step = json.loads((base.parent / "training.json").read_text())["step"]  # its best checkpoint's step
    assert 1 <= base_step <= 3

    replay = tmp_path / "replay"  # the rehearsal corpus: finished too
    shutil.copytree(data, replay)
    env = {**env, "BASE_MODEL": str(base), "NEXT_CORPUS": str(data), "OLD_CORPUS": str(data), "NEXT_STEPS": "2",
           "REPLAY_CORPUS": str(replay), "REPLAY_HOURS": "0.5", "HUMAN_MANIFEST": "", "EVAL_SPLITS": "dev",
           "EVAL_CONTEXT": "4,1", "EVAL_STREAMING": "4,0"}
    done = _run(env, "default", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== corpus" not in done.stdout
    run = Path((tmp_path / "state" / "default.run").read_text().strip())
    assert run.parent == tmp_path / "state" / "default"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["init_from"] == str(base)
    assert config["data"]["extra_train"] == [{"corpus_dir": str(replay), "split": "train", "hours": 0.5}]
    assert f"of {replay}/train join" in (run / "train.log").read_text()
    assert config["train"]["max_steps"] == base_step + 2  # the base model's steps, then NEXT_STEPS more
    assert config["optim"]["anneal_steps"] == 0  # NEXT_STEPS is within the 200-step rewarm
    assert _step(run) == base_step + 2
    assert f"step {base_step}, " in (run / "train.log").read_text()  # "warm start from BASE: step N, ..."
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == "| corpus | split | mode | current | next | next - current |"
    modes = [[c.strip() for c in line.strip("|").split("|")][2] for line in lines[1:]]
    assert modes == ["offline 4,1", "streaming 4,0"]
    assert {p.name for p in (tmp_path / "state" / "eval-default").glob("*.csv")} == {"current.csv", "next.csv"}

    # wise: the base and the continued run averaged; with one weight straight into the ship table
    wise = {**env, "WISE_WEIGHTS": "0.5"}
    done = _run(wise, "wise", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    averaged = tmp_path / "state" / "wise" / "0.5" / "model.nemo"
    record = json.loads((averaged.parent / "training.json").read_text())
    assert [(p["source"], p["weight"]) for p in record["averaged"]] == [
        (str(base), 0.5), (str(run / "checkpoints" / "best.pt"), 0.5)]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert lines[0] == "| corpus | split | mode | current | next | wise0.5 | wise0.5 - current |"
    assert {p.name for p in (tmp_path / "state" / "eval-default").glob("*.csv")} == {
        "current.csv", "next.csv", "wise0.5.csv"}
    # several weights: the dev split picks one of them, by its worst row against the shipped model
    several = {**wise, "WISE_WEIGHTS": "0.25 0.75", "WISE_DEV_LIMIT": "4"}
    done = _run(several, "wise", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    picked = (tmp_path / "state" / "eval-wise-dev" / "pick.txt").read_text().strip()
    assert picked in ("wise0.25", "wise0.75") and f"== wise: the dev split picks {picked}=" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("| corpus | split |")]
    assert lines[-1] == f"| corpus | split | mode | current | next | {picked} | {picked} - current |"
