"""SidecarEvaluator with two real processes: a trainer and an evaluator following its folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import pytest

import keepbest.keras
from keepbest.discovery import list_checkpoints
from keepbest import evaluation, store
from keepbest.store import INDEX as INDEX_DIR, LocalStore
from tests.helpers import flip_byte, spawn, wait_until
from tests.keras import sidecar_procs
from tests.keras.sidecar_procs import FILEPATH, make_model, read_log, weights_digest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


# How soon after training ended the evaluator (no idle_timeout: it waits for training) exits at most:
# generous for a loaded machine; it takes well under a second.
EXIT_BOUND = 25.0


def _spawn(role: str, directory: Path, log: Path, *args: str, ready=None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return spawn([sys.executable, str(HERE / "sidecar_procs.py"), role, str(directory), str(log), *args],
                 ready=ready, what=f"the {role} process", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def _events(log: Path, kind: str) -> list[dict]:
    return [e for e in read_log(str(log)) if e["event"] == kind]


def _ended_at(directory: Path) -> float:
    ended = evaluation.ended_series(store.open(directory))
    assert FILEPATH in ended, f"no end-of-training marker for {FILEPATH}: {ended}"
    return ended[FILEPATH]


def _run_pair(tmp_path: Path, *evaluator_args: str, epochs: int = 6) -> tuple[Path, Path, Path, str]:
    directory, tlog, elog = tmp_path / "ckpt", tmp_path / "train.log", tmp_path / "eval.log"
    # The evaluator runs before training starts (as "every" mode needs: retention cannot keep for an evaluator
    # what it deleted before the evaluator took its lease); its lease is taken right after its "start" event.
    evaluator = _spawn("evaluate", directory, elog, "--eval-seconds", "2", *evaluator_args,
                       ready=lambda: elog.exists() and '"start"' in elog.read_text())
    trainer = _spawn("train", directory, tlog, "--epochs", str(epochs), "--epoch-seconds", "0.5", "--keep-last", "2")
    _finish(trainer)
    return directory, tlog, elog, _finish(evaluator)


def test_every_mode_evaluates_each_checkpoint_and_retention_keeps_it_until_then(tmp_path):
    directory, tlog, elog, output = _run_pair(tmp_path, "--mode", "every")
    commits = _events(tlog, "commit")
    evaluated = _events(elog, "evaluated")
    assert [e["id"] for e in evaluated] == [c["id"] for c in commits]  # all six, in commit order
    # What was evaluated is what was committed: retention deleted nothing before its evaluation.
    assert [e["digest"] for e in evaluated] == [c["digest"] for c in commits]
    assert "quarantined" not in output and "deleted or saved again" not in output
    exit_event = _events(elog, "exit")[0]
    assert exit_event["reason"] == "training ended"
    after = exit_event["t"] - max(_ended_at(directory), evaluated[-1]["t"])
    print(f"every: exit {after:.2f} s after the end marker and the last evaluation (bound {EXIT_BOUND} s)")
    assert 0 <= after < EXIT_BOUND  # it exits after both, and soon
    # The trainer kept what the evaluator had not reached (keep_last=2 would have left two).
    assert len(list_checkpoints(directory)) > 2


def test_latest_mode_evaluates_the_final_checkpoint_and_exits_soon_after_the_end_marker(tmp_path):
    directory, tlog, elog, _ = _run_pair(tmp_path, "--mode", "latest")
    commits = _events(tlog, "commit")
    evaluated = _events(elog, "evaluated")
    assert evaluated[-1]["id"] == commits[-1]["id"]
    assert len(evaluated) < len(commits)  # it jumped ahead
    ids = [c["id"] for c in commits]
    assert [ids.index(e["id"]) for e in evaluated] == sorted(ids.index(e["id"]) for e in evaluated)
    after = _events(elog, "exit")[0]["t"] - _ended_at(directory)
    print(f"latest: exit {after:.2f} s after the end marker (bound {EXIT_BOUND} s)")
    assert 0 <= after < EXIT_BOUND


def test_export_is_labelled_with_the_evaluated_epoch_while_training_writes_newer_ones(tmp_path):
    export = str(tmp_path / "best" / "best-model-{epoch:04d}")
    directory, tlog, elog, _ = _run_pair(tmp_path, "--mode", "latest", "--export", export)
    by_id = {c["id"]: c for c in _events(tlog, "commit")}
    evaluated = _events(elog, "evaluated")
    raced = [e for e in evaluated if e["newest_epoch"] > by_id[e["id"]]["epoch"]]
    assert raced, "training never committed a newer checkpoint during an evaluation; the race was not exercised"
    exports = list_checkpoints(tmp_path / "best")
    assert exports
    for exported in exports:
        source = exported.manifest.extra["evaluated_checkpoint"]
        commit = by_id[f"{source['name']}@{source['created']!r}"]
        assert exported.epoch == commit["epoch"] and exported.name == f"best-model-{commit['epoch']:04d}"
        model = make_model()
        keepbest.keras.load_weights(model, exported.path)
        assert weights_digest(model) == commit["digest"]  # the weights are that epoch's, not a newer one's


def test_restarted_evaluator_evaluates_nothing_twice(tmp_path):
    directory, tlog, elog, _ = _run_pair(tmp_path, "--mode", "every", "--max-evaluations", "2", epochs=4)
    first = [e["id"] for e in _events(elog, "evaluated")]
    assert len(first) == 2
    elog2 = tmp_path / "eval2.log"
    _finish(_spawn("evaluate", directory, elog2, "--eval-seconds", "0", "--mode", "every"))
    second = [e["id"] for e in _events(elog2, "evaluated")]
    assert first + second == [c["id"] for c in _events(tlog, "commit")]
    assert evaluation.read_state(store.open(directory), "eval")[0].evaluations == 4  # type: ignore[union-attr]


def _train_in_process(directory: Path, epochs: int) -> None:
    model = make_model()
    x, y = sidecar_procs.train_data()
    model.fit(x, y, epochs=epochs, verbose=0, callbacks=[
        keepbest.keras.ModelCheckpoint(str(directory / FILEPATH), save_weights_only=True)])


def test_corrupt_checkpoint_is_quarantined_and_the_next_one_evaluated(tmp_path):
    directory, tlog, elog = tmp_path / "ckpt", tmp_path / "train.log", tmp_path / "eval.log"
    trainer = _spawn("train", directory, tlog, "--epochs", "4", "--epoch-seconds", "0.5", "--keep-last", "10")
    evaluator = _spawn("evaluate", directory, elog, "--eval-seconds", "2")
    wait_until(trainer, lambda: any(c["epoch"] == 2 for c in (_events(tlog, "commit") if tlog.exists() else [])),
               what="the trainer never saved epoch 2")
    # Training's second checkpoint is damaged on disk before the evaluator (2 s per checkpoint) reaches it.
    flip_byte(directory / "ckpt-0002" / "model.safetensors", offset=-5)
    _finish(trainer)
    output = _finish(evaluator)
    commits = [c["id"] for c in _events(tlog, "commit")]
    assert [e["id"] for e in _events(elog, "evaluated")] == [commits[0], *commits[2:]]
    assert "quarantined ckpt-0002" in output and "is corrupt" in output
    assert _events(elog, "exit")[0]["reason"] == "training ended"
    listed = {c.name: c for c in list_checkpoints(directory)}
    assert "is corrupt" in listed["ckpt-0002"].evaluations["eval"]["quarantined"]
    assert set(listed["ckpt-0003"].evaluations["eval"]["metrics"]) == {"loss", "accuracy"}
    # A restarted evaluator does not try it again.
    again = keepbest.keras.SidecarEvaluator(make_model(), sidecar_procs.eval_data(), directory, verbose=0)
    again.start()
    assert again.evaluated == []


def test_seed_example_runs_as_written(tmp_path):
    """keras-SidecarEvaluatorModelExport.md's example, with only the import line changed."""
    text = (ROOT / "tests" / "seeds" / "keras-SidecarEvaluatorModelExport.md").read_text()  # the page, verbatim
    block = text.split("```python", 1)[1]
    block = block[: block.index("sidecar_evaluator.start()") + len("sidecar_evaluator.start()")]
    # The page elides the loss and the optimizer ("loss=..., optimizer=...").
    block = block.replace("loss=..., optimizer=...", "loss=LOSS, optimizer='adam'")
    checkpoint_dir = str(tmp_path / "ckpt")
    _train_in_process(Path(checkpoint_dir), 2)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
    namespace = {"os": os, "model": model, "dataset": sidecar_procs.eval_data(), "checkpoint_dir": checkpoint_dir,
                 "LOSS": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}
    exec("from keepbest import keras\nfrom keepbest.keras.callbacks import SidecarEvaluatorModelExport\n" + block,
         namespace)
    exported = list_checkpoints(Path(checkpoint_dir) / "best_model_eval")
    assert [c.name for c in exported] == ["best-model-0001"]  # max_evaluations=1: the first checkpoint
    assert exported[0].manifest.extra["save_weights_only"] is True


def test_cli_sidecar_evaluates_exports_and_prints_a_line_per_evaluation(tmp_path):
    directory = tmp_path / "ckpt"
    _train_in_process(directory, 2)
    procs = str(HERE / "sidecar_procs.py")
    result = subprocess.run(
        [sys.executable, "-m", "keepbest.cli", "sidecar", str(directory), "--model", f"{procs}:make_model",
         "--data", f"{procs}:eval_data", "--export", str(tmp_path / "best" / "best-{epoch:02d}"),
         "--save-weights-only", "--series", FILEPATH],
        capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("SidecarEvaluator: evaluated")]
    assert [line.split()[2] for line in lines] == ["ckpt-0001", "ckpt-0002"]
    assert "loss=" in lines[0] and "accuracy=" in lines[0]
    assert "stopped (training ended); 2 checkpoint(s) evaluated" in result.stdout
    assert [c.name for c in list_checkpoints(tmp_path / "best")][-1] == "best-02"
    listed = subprocess.run([sys.executable, "-m", "keepbest.cli", "ls", "--wide", str(directory)],
                            capture_output=True, text=True, timeout=60).stdout
    assert "eval:loss" in listed.splitlines()[0]


def test_cli_sidecar_json_prints_one_document_of_what_it_evaluated(tmp_path):
    directory = tmp_path / "ckpt"
    _train_in_process(directory, 1)
    procs = str(HERE / "sidecar_procs.py")
    result = subprocess.run(
        [sys.executable, "-m", "keepbest.cli", "sidecar", str(directory), "--model", f"{procs}:make_model",
         "--data", f"{procs}:eval_data", "--series", FILEPATH, "--name", "quiet", "--json"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["evaluator"] == "quiet" and doc["stopped"] == "training ended"
    assert [(e["name"], sorted(e["metrics"])) for e in doc["evaluated"]] == [("ckpt-0001", ["accuracy", "loss"])]


def test_unbuilt_model_is_refused_before_anything_is_evaluated(tmp_path):
    class Sub(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(10)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(ValueError, match="has no weights yet.*call it on a batch"):
        keepbest.keras.SidecarEvaluator(Sub(), sidecar_procs.eval_data(), tmp_path).start()
    assert not (tmp_path / INDEX_DIR).exists()  # no lease taken


def test_keras_weights_files_are_followed_and_evaluated(tmp_path):
    model = make_model()
    x, y = sidecar_procs.train_data()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[
        keepbest.keras.ModelCheckpoint(str(tmp_path / "w{epoch:02d}.weights.h5"), save_weights_only=True)])
    evaluator = keepbest.keras.SidecarEvaluator(make_model(), (x, y), tmp_path, verbose=0)
    evaluator.start()
    assert [c.name for c, _ in evaluator.evaluated] == ["w01.weights.h5", "w02.weights.h5"]
    final = evaluator.evaluated[-1][1]
    assert final["loss"] == pytest.approx(model.evaluate(x, y, verbose=0, return_dict=True)["loss"], rel=1e-5)


def test_damaged_manifest_is_reported_once_and_the_others_evaluated(tmp_path, capsys):
    directory = tmp_path / "ckpt"
    _train_in_process(directory, 2)
    (directory / "ckpt-0001" / "manifest.json").write_text('{"format": "keepbest/checkpoint", "name": 3}')
    evaluator = keepbest.keras.SidecarEvaluator(make_model(), sidecar_procs.eval_data(), directory)
    evaluator.start()
    assert [c.name for c, _ in evaluator.evaluated] == ["ckpt-0002"]
    out = capsys.readouterr().out
    assert out.count("manifest cannot be read") == 1 and "ckpt-0001" in out


def test_evaluator_killed_mid_evaluation_resumes_with_that_checkpoint_and_repeats_nothing(tmp_path):
    directory, tlog, elog = tmp_path / "ckpt", tmp_path / "train.log", tmp_path / "eval.log"
    _finish(_spawn("train", directory, tlog, "--epochs", "3", "--epoch-seconds", "0", "--keep-last", "10"))

    def second_evaluation_begun() -> bool:  # (each one lasts 3 s: the kill lands inside it)
        evaluated = _events(elog, "evaluated") if elog.exists() else []
        state = evaluation.read_state(store.open(directory), "eval")[0] if evaluated else None
        return state is not None and state.evaluating not in (None, evaluated[0]["id"])

    victim = _spawn("evaluate", directory, elog, "--eval-seconds", "3", ready=second_evaluation_begun)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    first = [e["id"] for e in _events(elog, "evaluated")]
    assert len(first) == 1
    # Its lease survives the kill (until lease_ttl): training's retention still keeps what it had not evaluated.
    state = evaluation.read_state(store.open(directory), "eval")[0]
    assert state is not None and state.active and state.evaluating is not None
    elog2 = tmp_path / "eval2.log"
    _finish(_spawn("evaluate", directory, elog2, "--eval-seconds", "0"))
    second = [e["id"] for e in _events(elog2, "evaluated")]
    assert first + second == [c["id"] for c in _events(tlog, "commit")]
    assert second[0] == state.evaluating  # the interrupted one is evaluated again, nothing else is


def test_file_checkpoint_read_between_its_data_and_manifest_renames_is_not_quarantined(tmp_path, monkeypatch, capsys):
    """A slow commit of a Keras file (data renamed, manifest not yet) looks corrupt for a moment."""
    x, y = sidecar_procs.train_data()
    model = make_model()
    checkpoint = keepbest.keras.ModelCheckpoint(str(tmp_path / "last.weights.h5"), save_weights_only=True)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[checkpoint])
    paused = threading.Event()
    trainer = threading.current_thread()

    def slow_commit(self, point: str) -> None:
        if point == "data_published" and threading.current_thread() is not trainer:
            paused.set()
            time.sleep(3.0)  # longer than the evaluator's retries (1.7 s)

    monkeypatch.setattr(LocalStore, "_reached", slow_commit)
    second = threading.Thread(target=lambda: model.fit(x, y, epochs=1, verbose=0, callbacks=[checkpoint]))
    second.start()
    assert paused.wait(60)
    evaluator = keepbest.keras.SidecarEvaluator(make_model(), (x, y), tmp_path, mode="latest", verbose=1)
    evaluator.start()
    second.join()
    (ckpt, metrics), = evaluator.evaluated
    assert ckpt.manifest.created == list_checkpoints(tmp_path)[0].manifest.created  # the new version
    assert metrics["loss"] == pytest.approx(model.evaluate(x, y, verbose=0, return_dict=True)["loss"], rel=1e-5)
    assert "quarantined" not in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, r"`steps` must be a positive integer or None. Received: steps=0"),
    ({"max_evaluations": True}, r"`max_evaluations` must be a positive integer or None. Received: max_evaluations=True"),
    ({"idle_timeout": -1}, r"`idle_timeout` must be a number of seconds .* Received: idle_timeout=-1"),
    ({"mode": "all"}, r"mode must be 'every' .* Received: mode='all'"),
])
def test_evaluator_rejects_bad_arguments_at_construction(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        keepbest.keras.SidecarEvaluator(make_model(), sidecar_procs.eval_data(), tmp_path, **kwargs)


def test_export_accepts_save_freq_eval_and_rejects_batch_counts(tmp_path):
    export = keepbest.keras.SidecarEvaluatorModelExport(str(tmp_path / "b"), str(tmp_path / "c"), save_freq="eval")
    assert (export.save_freq, export.filepath, export.checkpoint_filepath) == (
        "eval", str(tmp_path / "b"), str(tmp_path / "c"))
    assert list(tmp_path.iterdir()) == []  # constructing it wrote nothing
    with pytest.raises(ValueError, match="save_freq must be 'eval'.*Received: save_freq=5"):
        keepbest.keras.SidecarEvaluatorModelExport(str(tmp_path / "b"), str(tmp_path / "c"), save_freq=5)


def test_export_rejects_a_val_monitor_with_the_name_to_use(tmp_path):
    with pytest.raises(ValueError, match="pass monitor='loss'. Received: monitor='val_loss'"):
        keepbest.keras.SidecarEvaluatorModelExport(str(tmp_path / "b"), str(tmp_path / "c"), monitor="val_loss")


def test_export_whose_checkpoint_filepath_is_elsewhere_is_refused(tmp_path):
    export = keepbest.keras.SidecarEvaluatorModelExport(str(tmp_path / "b"), str(tmp_path / "other" / FILEPATH))
    with pytest.raises(ValueError, match="checkpoint_filepath is in .*other, but the SidecarEvaluator follows"):
        keepbest.keras.SidecarEvaluator(make_model(), sidecar_procs.eval_data(), tmp_path / "ckpt",
                                        callbacks=[export])


def test_export_outside_an_evaluator_says_how_to_use_it(tmp_path):
    model = make_model()
    x, y = sidecar_procs.eval_data()
    export = keepbest.keras.SidecarEvaluatorModelExport(str(tmp_path / "b"), str(tmp_path / FILEPATH))
    with pytest.raises(RuntimeError, match=r"Pass it in SidecarEvaluator\(callbacks=\[...\]\)"):
        model.evaluate(x, y, verbose=0, callbacks=[export])


def test_export_best_value_survives_an_evaluator_restart(tmp_path):
    directory = tmp_path / "ckpt"
    _train_in_process(directory, 3)  # the loss falls every epoch: ckpt-0003 is the best

    def export() -> keepbest.keras.SidecarEvaluatorModelExport:
        return keepbest.keras.SidecarEvaluatorModelExport(str(tmp_path / "best" / "best-{epoch:04d}"),
                                                          str(directory / FILEPATH), save_weights_only=True)

    keepbest.keras.SidecarEvaluator(make_model(), sidecar_procs.eval_data(), directory, mode="latest",
                                    callbacks=[export()], verbose=0).start()
    assert [c.name for c in list_checkpoints(tmp_path / "best")] == ["best-0003"]
    # A new evaluator process (another name, so it starts from the first checkpoint) with a new callback:
    again = keepbest.keras.SidecarEvaluator(make_model(), sidecar_procs.eval_data(), directory, name="again",
                                            callbacks=[export()], verbose=0)
    again.start()
    assert [c.name for c, _ in again.evaluated] == ["ckpt-0001", "ckpt-0002", "ckpt-0003"]
    assert [c.name for c in list_checkpoints(tmp_path / "best")] == ["best-0003"]  # nothing worse exported
