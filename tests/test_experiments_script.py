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
import signal
import subprocess
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


def _step(run: Path) -> int:
    return int(json.loads((run / "metrics.json").read_text())["step"])


def test_stages_record_their_runs_resume_and_compare(tmp_path: Path, corpus: Path) -> None:  # noqa: F811
    state = tmp_path / "state"
    env = {
        **_recipes(tmp_path, corpus),
        "CORPUS": str(corpus),
        "STATE": str(state),
        "STREAMER_STATE__DIR": "",
        "PRETRAIN_STEPS": "4",
        "FINETUNE_STEPS": "4",
        "FINETUNE_HOURS": "1",
        "PARAFORMER_STEPS": "3",
        "EVAL_LIMIT": "4",
        "EVAL_CONTEXT": "4,1",
        "EVAL_SPLITS": "dev",
    }
    assert "not started" in _run(env, "status").stdout

    done = _run(env, "bestrq")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {s: Path((state / f"{s}.run").read_text().strip())
            for s in ("bestrq-pretrain", "bestrq-finetune-pretrained", "bestrq-finetune-scratch")}
    assert len(set(runs.values())) == 3
    for run in runs.values():
        assert run.parent == state and (run / "checkpoints" / "best.pt").is_file()
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
    before = sorted(p.name for p in state.iterdir())
    again = _run(env, "bestrq")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in state.iterdir()) == before
    assert again.stdout.count("continuing") == 3

    # the Paraformer stage, stopped with SIGTERM part way, continues its own run on the next call
    env_long = {**env, "PARAFORMER_STEPS": "400"}
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
    assert 3 <= stopped_at < 400, stopped_output
    resumed = _run({**env, "PARAFORMER_STEPS": "3"}, "paraformer")  # the size of a recorded run cannot change
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing {paraformer}" in resumed.stdout
    assert (state / "paraformer.run").read_text().strip() == str(paraformer)
    assert _step(paraformer) > stopped_at  # it went on from where it stopped (its own max_steps: 400)

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
