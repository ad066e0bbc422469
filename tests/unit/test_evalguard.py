"""evalguard: a VM that starts while a dev shell is evaluated waits for it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from microvm_run import evalguard


def test_a_launch_on_an_overlapping_project_waits_for_the_evaluation(tmp_path: Path) -> None:
    base = tmp_path / "run"
    project = tmp_path / "src" / "proj"
    said: list[str] = []
    waited = threading.Event()

    def launch(on: Path) -> None:
        evalguard.wait_for_evaluations(base, on, said.append)
        waited.set()

    with evalguard.evaluating(base, project):
        # Unrelated projects (a sibling) do not wait.
        evalguard.wait_for_evaluations(base, tmp_path / "src" / "other", said.append)
        assert said == []
        # A VM on a directory containing the project does.
        vm = threading.Thread(target=launch, args=(tmp_path / "src",))
        vm.start()
        time.sleep(0.3)
        assert not waited.is_set()
        assert said == [f"waiting for the dev shell of {project} to finish evaluating"]
    vm.join(timeout=5)
    assert waited.is_set()
    assert list(base.iterdir()) == []  # the lock file goes with the evaluation


def test_no_evaluation_no_wait_and_no_base_is_fine(tmp_path: Path) -> None:
    evalguard.wait_for_evaluations(tmp_path / "absent", tmp_path, print)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "devshell-eval-1").write_text("relative/not/a/project")
    evalguard.wait_for_evaluations(tmp_path / "run", tmp_path, print)
