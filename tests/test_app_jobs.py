"""app/jobs.py: one job at a time, log capture, pid/exit files, cancel (SIGTERM, then SIGKILL)."""
import json
import os
import sys
import time

import pytest

from app import runs as R
from app.jobs import Job, JobQueue


def py(code):
    return [sys.executable, "-c", code]


@pytest.fixture
def queue():
    q = JobQueue(grace_s=1.0)
    yield q
    q.shutdown()


def wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_jobs_run_one_at_a_time_in_order(tmp_path, queue):
    stamps = tmp_path / "stamps.jsonl"
    code = ("import json, sys, time; t0 = time.time(); time.sleep(0.4); "
            f"open({str(stamps)!r}, 'a').write(json.dumps([sys.argv[1], t0, time.time()]) + '\\n')")
    jobs = [queue.submit(Job(id=f"j{i}", run_dir=tmp_path / f"j{i}", cmd=py(code) + [f"j{i}"])) for i in range(3)]
    assert wait_for(lambda: queue.position("j0") == 0)
    assert (queue.position("j1"), queue.position("j2")) == (1, 2)
    assert queue.wait(timeout=30)
    rows = [json.loads(line) for line in stamps.read_text().splitlines()]
    assert [r[0] for r in rows] == ["j0", "j1", "j2"]
    for (_, _, end), (_, start, _) in zip(rows, rows[1:]):
        assert start >= end                                   # never two at once
    assert all(j.state == "finished" and j.returncode == 0 for j in jobs)
    assert queue.position("j0") is None


def test_log_pid_and_exit_files(tmp_path, queue):
    run = tmp_path / "run"
    job = queue.submit(Job(id="r", run_dir=run, cmd=py("import sys; print('hello'); "
                                                      "print('error: bad flag', file=sys.stderr); sys.exit(2)")))
    assert queue.wait(["r"], timeout=20)
    assert job.state == "failed" and job.returncode == 2
    log = (run / R.LOG_FILE).read_text()
    assert "hello" in log and "error: bad flag" in log and log.startswith("$ ")
    assert json.loads((run / R.PID_FILE).read_text())["pid"] > 0
    assert json.loads((run / R.EXIT_FILE).read_text())["returncode"] == 2
    ri = R.info(run)
    assert ri.status == "failed" and "error: bad flag" in ri.detail


def test_a_command_that_cannot_start_fails_cleanly(tmp_path, queue):
    job = queue.submit(Job(id="x", run_dir=tmp_path / "x", cmd=[str(tmp_path / "no-such-program")]))
    assert queue.wait(["x"], timeout=10)
    assert job.state == "failed" and "could not start" in job.note
    assert R.status(tmp_path / "x")[0] == "failed"


def test_cancel_running_job_terminates_its_whole_group(tmp_path, queue):
    # a trainer-like parent with a child process; SIGTERM reaches both (one process group)
    child_pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(child_pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    job = queue.submit(Job(id="g", run_dir=tmp_path / "g", cmd=py(code)))
    assert wait_for(child_pid_file.exists)
    child = int(child_pid_file.read_text())
    assert queue.cancel("g")
    assert queue.wait(["g"], timeout=10)
    assert job.state == "cancelled"
    assert wait_for(lambda: R.process_start(child) is None, 5)  # the grandchild is gone too
    assert R.status(tmp_path / "g")[0] == "cancelled"
    assert "cancelled by the user" in (tmp_path / "g" / R.LOG_FILE).read_text()


def test_cancel_escalates_to_sigkill_after_the_grace_period(tmp_path, queue):
    ready = tmp_path / "ready"
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"open({str(ready)!r}, 'w').write('1'); time.sleep(60)")
    job = queue.submit(Job(id="stubborn", run_dir=tmp_path / "s", cmd=py(code)))
    assert wait_for(ready.exists)
    t0 = time.monotonic()
    queue.cancel("stubborn")
    assert queue.wait(["stubborn"], timeout=15)
    assert job.state == "cancelled" and job.returncode == -9
    assert 0.9 <= time.monotonic() - t0 < 8


def test_sigterm_lets_the_job_finish_its_checkpoint(tmp_path, queue):
    ready, ckpt = tmp_path / "ready", tmp_path / "checkpoint-1"
    code = ("import signal, sys, time, pathlib\n"
            "def stop(*_):\n"
            f"    pathlib.Path({str(ckpt)!r}).mkdir(); sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            f"open({str(ready)!r}, 'w').write('1')\n"
            "time.sleep(60)\n")
    job = queue.submit(Job(id="t", run_dir=tmp_path / "t", cmd=py(code)))
    assert wait_for(ready.exists)
    queue.cancel("t")
    assert queue.wait(["t"], timeout=10)
    assert job.state == "cancelled" and job.returncode == 143 and ckpt.is_dir()


def test_cancel_a_waiting_job_means_it_never_starts(tmp_path, queue):
    marker = tmp_path / "ran"
    (tmp_path / "b").mkdir()                                  # the app creates run folders at submit
    queue.submit(Job(id="first", run_dir=tmp_path / "a", cmd=py("import time; time.sleep(1)")))
    assert wait_for(lambda: queue.position("first") == 0)
    second = queue.submit(Job(id="second", run_dir=tmp_path / "b", cmd=py(f"open({str(marker)!r}, 'w')")))
    assert queue.position("second") == 1
    assert queue.cancel("second")
    assert queue.wait(timeout=20)
    assert second.state == "cancelled" and not marker.exists()
    assert R.status(tmp_path / "b")[0] == "cancelled"
    assert not queue.cancel("second")                         # already done


def test_shutdown_leaves_no_process_behind(tmp_path):
    q = JobQueue(grace_s=1.0)
    pid_file = tmp_path / "pid"
    q.submit(Job(id="long", run_dir=tmp_path / "l",
                 cmd=py(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")))
    q.submit(Job(id="next", run_dir=tmp_path / "n", cmd=py("pass")))
    assert wait_for(pid_file.exists)
    q.shutdown()
    assert R.process_start(int(pid_file.read_text())) is None
    assert q.get("long").state == "cancelled" and q.get("next").state == "cancelled"
    with pytest.raises(RuntimeError):
        q.submit(Job(id="late", run_dir=tmp_path / "z", cmd=py("pass")))


def test_duplicate_active_job_id_is_refused(tmp_path, queue):
    queue.submit(Job(id="d", run_dir=tmp_path / "d", cmd=py("import time; time.sleep(1)")))
    with pytest.raises(ValueError):
        queue.submit(Job(id="d", run_dir=tmp_path / "d", cmd=py("pass")))
    assert os.path.isdir(tmp_path / "d") or queue.position("d") is not None
