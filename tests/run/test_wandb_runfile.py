"""A corrupt, truncated or empty offline W&B run is reported as such (issue 20, part 4).

A real offline run is written once per module by the installed wandb (``WandbLogger``,
offline), with a config large enough that one record spans several 32 KiB blocks; copies of its
``.wandb`` file are then cut at chosen points (an empty file, inside the file header,
inside a record header, inside a record, at a record boundary before the exit record, in
the middle of a multi-block record) or have one byte flipped, and the verdict of
``featcal.wandb_runfile.run_file_problem`` is checked against where the cut was made: the
offsets come from reading the clean file back (``read_run_file``, records decoded with
wandb's own protobuf classes), not from constants.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from featcal.utils import atomic_write_json
from tests.fixtures.wandb_records import finished_results

TASKS = ["inverted", "rot90"]


def results_dict() -> dict:
    return finished_results(timings={"calibrate": 1.0}, loss_curve=[{"step": i, "loss": 1.0 / (i + 1)} for i in range(3)])


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A finished offline W&B run written by the installed wandb; returns its .wandb file."""
    from featcal.wandb_log import WandbLogger
    from featcal.wandb_runfile import offline_runs

    job = tmp_path_factory.mktemp("job")
    big = {"seed": 0, "notes": ["x" * 100 + str(i) for i in range(800)]}  # a config record over two 32 KiB blocks
    logger = WandbLogger({"mode": "offline", "project": "p"}, job, big, name="n", group=None, rid="fc-runfile")
    logger.log_results(results_dict())
    logger.finish()
    assert logger.error is None, logger.error
    (run,) = offline_runs(job)
    (file,) = run.glob("run-*.wandb")
    return file


def _cut(src: Path, tmp_path: Path, data: bytes) -> Path:
    f = tmp_path / src.name
    f.write_bytes(data)
    return f


def _fragments(data: bytes):
    """(offset, length, type) of every fragment of a well-formed file (block framing)."""
    pos, out = 7, []
    while pos < len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        out.append((pos, length, kind))
        pos += 7 + length
    return out


def test_clean_file_passes_and_reads_back(clean_run):
    from featcal.wandb_runfile import check_offline_run, read_run_file, run_file_problem

    assert run_file_problem(clean_run) is None and check_offline_run(clean_run.parent) is None
    records = read_run_file(clean_run)
    kinds = [rec.WhichOneof("record_type") for _, rec in records]
    assert kinds[0] == "header" and "run" in kinds and kinds[-1] in ("exit", "final") and "exit" in kinds
    run = next(rec.run for _, rec in records if rec.WhichOneof("record_type") == "run")
    assert run.run_id == "fc-runfile" and run.project == "p"
    # the big config really spans blocks: FIRST / MIDDLE / LAST fragments were read
    assert clean_run.stat().st_size > 2 * 32768
    assert {2, 3, 4} <= {kind for _, _, kind in _fragments(clean_run.read_bytes())}


def test_truncations_and_corruption_are_named(clean_run, tmp_path):
    from featcal.wandb_runfile import read_run_file, run_file_problem

    data = clean_run.read_bytes()
    records = read_run_file(clean_run)
    frags = _fragments(data)
    exit_at = next(off for off, rec in records if rec.WhichOneof("record_type") == "exit")
    run_at = next(off for off, rec in records if rec.WhichOneof("record_type") == "run")
    first_frag = next(f for f in frags if f[2] == 2)  # a record split over blocks
    cases = {
        "empty": (b"", "is empty"),
        "mid file header": (data[:3], "truncated inside its file header (3 of 7 bytes)"),
        "header only": (data[:7], "holds no records"),
        "mid record header": (data[:run_at + 3], f"truncated inside a record header at byte {run_at}"),
        "mid record": (data[:run_at + 7 + 5], f"truncated mid-record at byte {run_at} (5 of"),
        "before the run record": (data[:run_at], "holds no run record"),
        "before the exit record": (data[:exit_at], "incomplete: no exit record"),
        "inside the exit record": (data[:exit_at + 9], f"truncated mid-record at byte {exit_at}"),
        "after a first fragment": (data[:first_frag[0] + 7 + first_frag[1]], f"truncated mid-record at byte {first_frag[0]}"),
        "zeros after a crash": (data[:run_at] + bytes(len(data) - run_at), f"truncated: zero bytes from byte {run_at}"),
    }
    for name, (cut, expected) in cases.items():
        problem = run_file_problem(_cut(clean_run, tmp_path, cut))
        assert problem is not None and expected in problem, (name, problem)
    flipped = bytearray(data)
    flipped[run_at + 7 + 10] ^= 0x40
    problem = run_file_problem(_cut(clean_run, tmp_path, bytes(flipped)))
    assert f"corrupt record at byte {run_at} (checksum mismatch)" in problem
    not_wandb = b"PK\x03\x04" + data[4:]
    assert "not a W&B run file" in run_file_problem(_cut(clean_run, tmp_path, not_wandb))


def test_bad_runs_are_set_aside_out_of_wandb_syncs_reach(clean_run, tmp_path):
    from featcal.wandb_runfile import offline_runs, set_aside_bad_runs

    job = tmp_path / "job"
    good = job / "wandb" / clean_run.parent.name
    shutil.copytree(clean_run.parent, good)
    killed = job / "wandb" / "offline-run-20260101_000000-fc-killed"
    killed.mkdir(parents=True)
    (killed / "run-fc-killed.wandb").write_bytes(clean_run.read_bytes()[:7])  # a killed job: header only
    moved = set_aside_bad_runs(job)
    assert [(p.name, "holds no records" in why) for p, why in moved] == [(killed.name, True)]
    assert offline_runs(job) == [good] and not killed.exists()
    # what `wandb sync <job>/wandb` (runs one level down) or `<job>/wandb/offline-run-*` would take
    assert {p.resolve().parent for p in (job / "wandb").glob("*/*.wandb")} == {good.resolve()}
    assert list((job / "wandb" / "not-synced").glob("*/*.wandb.corrupt"))


def _job(root: Path, run_file: Path | None, cut: int | None) -> Path:
    """A finished job folder whose results.json says W&B logged it offline, with its run."""
    res = results_dict()
    config = {"seed": 0, "budget": {"per_task": 8, "split": "train", "batch_size": 16}, "logger": {"name": "wandb"},
              "backbone": {"tasks": TASKS}, "merge": {"_target_": "featcal.merge.task_arithmetic"},
              "calibration": {"_target_": "featcal.calibration.feature_calibration.FeatCal"}}
    res.update(config=config, config_hash="0" * 16)
    root.mkdir(parents=True)
    (root / ".hydra").mkdir()
    (root / ".hydra" / "config.yaml").write_text(json.dumps(config))
    (root / ".hydra" / "overrides.yaml").write_text("- calibration=featcal\n")
    if run_file is not None:
        run = root / "wandb" / run_file.parent.name
        run.mkdir(parents=True)
        data = run_file.read_bytes()
        (run / run_file.name).write_bytes(data if cut is None else data[:cut])
        res["wandb"] = {"id": "fc-runfile", "group": "sweep-x", "project": "p", "entity": None, "mode": "offline",
                        "status": "logged", "run_folder": str(run)}
    atomic_write_json(root / "results.json", res)
    from featcal.report.run_tables import long_rows, rows_to_csv

    (root / "results.csv").write_text(rows_to_csv(long_rows({"run_dir": str(root), **{k: res[k] for k in
                                      ("backbone", "merge", "calibration", "budget", "split", "seed")}},
                                      res["metrics"], res["score"], res["primary_metric"])))
    return root


def test_report_names_corrupt_offline_runs(clean_run, tmp_path):
    from featcal.report.load import load
    from featcal.report.sweep import report

    sweep = tmp_path / "sweep"
    _job(sweep / "0", clean_run, None)
    _job(sweep / "1", clean_run, clean_run.stat().st_size - 20)  # a full disk cut the last record
    _long, _runs, _drift, info = load([sweep])
    assert [(p.parent.parent.name, "truncated mid-record" in why) for p, why in info["wandb_problems"]] == [("1", True)]
    written = report([sweep], tmp_path / "report", use_wandb=False)
    assert any(n.startswith("W&B: corrupt or incomplete offline run") and "/1/wandb/" in n for n in written["notes"])
    md = (tmp_path / "report" / "table.md").read_text()
    assert "Corrupt or incomplete offline W&B runs (1)" in md and "truncated mid-record" in md


@pytest.mark.slow  # starts W&B once
def test_truncated_file_after_logging_is_a_failure_not_a_path(tmp_path, monkeypatch, capsys):
    """The file is cut as a full disk cuts it, after W&B's service wrote it: the run says
    it was not logged (and why), records status failed, and does not print the path as a success."""
    import wandb

    from featcal import run as run_mod
    from featcal.wandb_log import WandbLogger

    original = wandb.teardown

    def teardown_then_truncate(*a, **k):
        original(*a, **k)
        for f in (tmp_path / "job" / "wandb").glob("offline-run-*/run-*.wandb"):
            f.write_bytes(f.read_bytes()[:-11])

    monkeypatch.setattr(wandb, "teardown", teardown_then_truncate)
    job = tmp_path / "job"
    job.mkdir()
    atomic_write_json(job / "results.json", results_dict())
    logger = WandbLogger({"mode": "offline", "project": "p"}, job, {}, name="n", group=None, rid="fc-trunc")
    run_mod._log_results(logger, results_dict(), job, {})
    out = capsys.readouterr().out
    stored = json.loads((job / "results.json").read_text())["wandb"]
    assert stored["status"] == "failed" and "truncated mid-record" in stored["error"]
    assert "W&B: not logged" in out and "truncated mid-record" in out and "W&B (offline):" not in out


@pytest.mark.slow  # starts W&B once
def test_resume_sets_aside_a_corrupt_run_and_logs_the_results_again(clean_run, tmp_path, monkeypatch, capsys):
    """results.json says "logged" but its offline run file was cut short: the next
    featcal-run of the configuration sets it aside and logs the stored results again,
    without recomputing."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from featcal import run as run_mod
    from featcal.resume import config_hash
    from featcal.wandb_runfile import offline_runs, run_file_problem

    for k in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(k, raising=False)
    with initialize_config_dir(config_dir=run_mod.CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["backbone=embedded_small", "budget.per_task=8", "logger.mode=offline"])
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out = _job(tmp_path / "job", clean_run, clean_run.stat().st_size // 2)
    res = json.loads((out / "results.json").read_text())
    res["config_hash"] = config_hash(cfg)
    atomic_write_json(out / "results.json", res)
    monkeypatch.setattr(run_mod, "_run_measured", lambda *a, **k: pytest.fail("recomputed"))
    run_mod.run(cfg, out)
    printed = capsys.readouterr().out
    assert "set aside a corrupt or incomplete offline run" in printed
    (run,) = offline_runs(out)
    assert run.name != clean_run.parent.name and run_file_problem(next(run.glob("*.wandb"))) is None
    # only the good run is syncable (wandb sync counts the latest-run link's file once: same inode)
    assert {p.resolve().parent for p in (out / "wandb").glob("*/*.wandb")} == {run.resolve()}
    stored = json.loads((out / "results.json").read_text())
    assert stored["wandb"]["status"] == "logged" and stored["wandb"]["run_folder"] == str(run)
    assert stored["score"] == res["score"]
