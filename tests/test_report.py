"""report.py on real sweeps: train.py -m with a job that fails inside, evaluate.py -m over post-hoc EMA widths;
status.json from run/jobs/guard.py's guarded(); the loss-by-t file; W&B summary metrics and the report's W&B Table."""

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from diffusion.core.posthoc_ema import load_posthoc_ema
from diffusion.errors import Interrupted, UserError
from diffusion.lightning.callbacks import LossByTLog
from diffusion.lightning.callbacks.loss_by_t import read_loss_by_t
from diffusion.metrics.quality import measurement_id, protocol_id
from diffusion.run.commands.report import bin_title, report
from diffusion.run.jobs import status as job_status
from diffusion.run.jobs.guard import guarded
from diffusion.run.reports.sweep import find_jobs
from helpers import (
    compose_cfg,
    ddpm,
    diffusion_module,
    edm,
    flow,
    paper_betas,
    run_script,
    wandb_history,
    wandb_records,
)

LRS = ["0.001", "0.002", "0.0005", "1e+30"]  # Adam at 1e30: an infinite loss at step 1, inside the job


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_a_train_sweep_of_four_jobs_gives_four_rows_and_the_failed_jobs_error(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script("train.py", "-m", "debug=fast", f"optim.optimizer.lr={','.join(LRS)}",
                        "callbacks.quality.at_train_end=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                        timeout=900, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    # The failing job (the last) does not hide the others; the sweep ends with its one line.
    assert result.returncode == 1, result.stderr[-3000:]
    folders = [f"{i}_callbacks.quality.at_train_end=True,optim.optimizer.lr={lr}" for i, lr in enumerate(LRS)]
    assert f"error: job 3 ({folders[3][2:]}) failed: training loss is inf at step 1" in result.stderr
    jobs = [sweep / folder for folder in folders]
    statuses = [json.loads((job / "status.json").read_text()) for job in jobs]
    assert [s["status"] for s in statuses] == ["finished"] * 3 + ["failed"]

    # The post-hoc EMA callback is on by default: snapshots at debug=fast's every 2 steps, loadable.
    for job in jobs[:3]:
        assert sorted(p.name for p in (job / "posthoc_ema").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    state, info = load_posthoc_ema(jobs[0] / "posthoc_ema", 0.10)
    assert info["step"] == 4 and "conv_in.weight" in state

    # status.json holds the run's own final numbers: those of its W&B history, and the quality protocol
    history = wandb_history(jobs[0])
    last = {k: v for h in history for k, v in h.items()}
    for key in ("val/loss", "val/bpd", "val/fid"):
        assert statuses[0]["metrics"][key] == pytest.approx(last[key], rel=1e-6)
    assert statuses[0]["step"] == 4
    assert statuses[0]["quality_protocol_id"] == protocol_id(statuses[0]["quality_protocol"])
    metric_records = [r["metric"] for r in wandb_records(jobs[0]) if r.get("type") == "metric"]
    assert {"name": "val/fid", "summary": {"min": True}}.items() <= next(
        m for m in metric_records if m.get("name") == "val/fid").items()
    assert next(m for m in metric_records if m.get("name") == "val/bpd")["summary"] == {"last": True}

    done = run_script("report.py", str(sweep), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (f"report: {sweep / 'report.md'} and {sweep / 'report.csv'} "
                                                    "(4 jobs: 3 finished, 1 failed)")
    rows = read_csv(sweep / "report.csv")
    assert [r["optim.optimizer.lr"] for r in rows] == LRS
    assert [r["status"] for r in rows] == ["finished"] * 3 + ["failed"]
    assert rows[3]["note"] == statuses[3]["error"] and rows[3]["note"].startswith("training loss is inf at step 1;")
    # the inf at step 1 is read on the host before the checkpoint of step 2 (training.nonfinite_check_every_n_steps):
    # the run stops there, saving nothing the inf touched
    assert rows[3]["step"] == "2" and [r["step"] for r in rows[:3]] == ["4"] * 3
    fid = f"val/fid [{measurement_id(statuses[0]['quality_protocol'])}]"
    for row, status in zip(rows[:3], statuses, strict=False):
        assert float(row[fid]) == pytest.approx(status["quality"]["val/fid"])
        assert float(row["val/bpd"]) == pytest.approx(status["metrics"]["val/bpd"])
        assert float(row["wall_seconds"]) == pytest.approx(status["wall_seconds"])
    assert rows[3][fid] == ""
    markdown = (sweep / "report.md").read_text()
    assert "| 3 | 1e+30 | failed | 2 |" in markdown and "report_vs_optim.optimizer.lr.png" in markdown
    for png in ("report_vs_optim.optimizer.lr.png", "report_loss_by_t.png"):
        assert (sweep / png).stat().st_size > 5000

    # The same table in W&B, in the sweep's group (the group the jobs' runs are in)
    run_record = next(r["run"] for r in wandb_records(sweep) if r.get("type") == "run")
    job_group = next(r["run"] for r in wandb_records(jobs[0]) if r.get("type") == "run")["run_group"]
    assert run_record["run_group"] == job_group == "default-sweep" and run_record["job_type"] == "report"
    [table_file] = sweep.glob("wandb/offline-run-*/files/media/table/sweep/report_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(rows[0]) and [r[1] for r in table["data"]] == LRS


def write_job(folder: Path, overrides: list[str]) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("name: x\nlogger: null\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_loss_by_level_of_three_objectives_is_plotted_with_each_objectives_own_bins(tmp_path):
    """DDPM bins its loss by step, flow by t in [0, 1], EDM by σ: the report plots all three, titled in their units."""
    bins = {"ddpm": ["t0000-0099", "t0900-0999"], "flow": ["t0.00-0.10", "t0.90-1.00"],
            "edm": ["sigma0.00823-0.0169", "sigma5.37-11"]}
    for k, (objective, names) in enumerate(bins.items()):
        write_job(tmp_path / f"{k}_objective={objective}", [f"objective={objective}"])
        rows = "".join(f"{step},{step / 10},{step / 20}\n" for step in (11, 22))
        (tmp_path / f"{k}_objective={objective}" / "loss_by_t.csv").write_text(f"step,{','.join(names)}\n{rows}")
    out = report([tmp_path], use_wandb=False)
    assert (out / "report_loss_by_t.png").stat().st_size > 1000
    assert [bin_title(n) for names in bins.values() for n in names] == [
        "t in [0, 99]", "t in [900, 999]", "t in [0.00, 0.10]", "t in [0.90, 1.00]", "σ in [0.00823, 0.0169]",
        "σ in [5.37, 11]"]
    assert bin_title("val/loss") == "val/loss"


def test_one_sampler_setting_on_three_objectives_is_one_measurement_of_three_models():
    """A sweep over objectives (or T) compares them in one column; another sampler or sample count is another."""
    base = {"num_generated": 1000, "reference": {"train": {"num_images": 1500}}, "extractor": "digits-cnn-v1",
            "extractor_sha256": "0505ec543d97", "seed": 0, "settings": {},
            "sampler": {"name": "heun", "steps": 35, "eta": None, "spacing": "karras", "clip_denoised": True}}
    protocols = [{**base, **objective.protocol(), "weights": "ema"} for objective in (ddpm(), edm(), flow())]
    protocols.append({**base, **ddpm(paper_betas(100)).protocol(), "weights": "posthoc-ema sigma_rel=0.05"})
    assert len({protocol_id(p) for p in protocols}) == 4 and len({measurement_id(p) for p in protocols}) == 1
    assert measurement_id({**base, "num_generated": 500}) != measurement_id(base)
    assert measurement_id({**base, "sampler": {**base["sampler"], "steps": 9}}) != measurement_id(base)


def test_report_on_a_folder_that_is_not_a_sweep_is_one_line(tmp_path):
    (tmp_path / "plain" / "sub").mkdir(parents=True)
    result = run_script("report.py", str(tmp_path / "plain"), cwd=tmp_path)
    assert one_line_error(result) == (f"error: {tmp_path / 'plain'} is not a sweep: no job folders with "
                                      ".hydra/config.yaml in it; give a multirun folder (multirun/<name>/<time>) "
                                      "or run folders (outputs/<name>/<time>)")
    with pytest.raises(UserError, match="is not a folder"):
        find_jobs([tmp_path / "missing"])


def test_jobs_below_path_valued_folders_in_number_order_with_each_status(tmp_path):
    """An override whose value is a path nests Hydra's job folder: 10_x=/a/b is the folder 10_x=/a/b."""
    for name in ["10_root=/data/a", "2_root=/data/b", "1_root=c"]:
        write_job(tmp_path / name, [f"root={name.split('=')[1]}", "seed=1"])
    found = find_jobs([tmp_path])
    assert [name for _, name in found] == ["1_root=c", "2_root=/data/b", "10_root=/data/a"]
    (tmp_path / "2_root=/data/b" / "status.json").write_text(json.dumps(
        {"status": "interrupted", "error": "stopped by SIGTERM at step 30", "resume": "python train.py ckpt_path=x",
         "step": 30, "wall_seconds": 12.5, "metrics": {"train/loss": 0.25}}))
    (tmp_path / "1_root=c" / "status.json").write_text(json.dumps({"status": "running", "wall_seconds": 0.0}))
    out = report([tmp_path], use_wandb=False)
    table = read_csv(out / "report.csv")
    assert [r["root"] for r in table] == ["c", "/data/b", "/data/a"] and "seed" not in table[0]  # seed: not swept
    assert [r["status"] for r in table] == ["running", "interrupted", "unknown"]
    assert table[0]["note"] == "no end recorded: still running, or killed" and "no status.json" in table[2]["note"]
    assert table[1]["note"] == "stopped by SIGTERM at step 30; resume with: python train.py ckpt_path=x"
    assert (table[1]["step"], table[1]["train/loss"]) == ("30", "0.25")


# status.json, written by guarded around a job


def hydra_job(tmp_path: Path, mode: RunMode = RunMode.RUN):
    """A composed train config with Hydra's runtime set (as in a job), in RUN or MULTIRUN mode."""
    cfg = compose_cfg("train", ["debug=fast"], tmp_path)
    hydra = HydraConfig.get()
    with read_write(hydra), open_dict(hydra):
        hydra.mode = mode
        hydra.job.config_name = "train"
    return cfg


def test_guarded_writes_finished_failed_and_interrupted_status(tmp_path, capsys):
    cfg = hydra_job(tmp_path)

    def measured(c):
        job_status.record(step=7, metrics={"val/bpd": 4.5})
        return 1.0

    assert guarded(measured, cfg) == 1.0
    status = job_status.read_status(tmp_path)
    assert status["status"] == "finished" and status["step"] == 7 and status["metrics"] == {"val/bpd": 4.5}
    assert status["entry"] == "train" and status["error"] is None and status["wall_seconds"] >= 0

    def bad(c):
        raise UserError("data.root /x does not exist; give the folder")

    with pytest.raises(SystemExit) as exit_info:
        guarded(bad, cfg)
    assert exit_info.value.code == 2
    status = job_status.read_status(tmp_path)
    assert status["status"] == "failed" and status["error"] == "data.root /x does not exist; give the folder"
    assert status["metrics"] == {}  # nothing carried over from the job before

    def stopped(c):
        job_status.record(step=3)
        raise Interrupted("stopped by SIGTERM at step 3, checkpoint saved", 143, "/r/checkpoints/last.ckpt")

    with pytest.raises(SystemExit):
        guarded(stopped, cfg)
    status = job_status.read_status(tmp_path)
    assert status["status"] == "interrupted" and status["step"] == 3
    assert status["resume"].endswith(" ckpt_path=/r/checkpoints/last.ckpt")
    assert f"resume with: {status['resume']}" in capsys.readouterr().err


def test_a_failed_job_of_a_multirun_is_reported_and_the_sweep_goes_on(tmp_path, capsys):
    cfg = hydra_job(tmp_path, RunMode.MULTIRUN)
    assert guarded(lambda c: (_ for _ in ()).throw(UserError("the value is bad; fix it")), cfg) is None
    assert capsys.readouterr().err.strip().endswith("failed: the value is bad; fix it")
    assert job_status.read_status(tmp_path)["status"] == "failed"


# The loss-by-t file


class Recorded(L.pytorch.loggers.Logger):
    """What a logger receives: (step, metrics) for every call."""

    name, version = "recorded", 0

    def __init__(self):
        super().__init__()
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_loss_by_t_file_holds_each_epochs_logged_values(tmp_path):
    torch.manual_seed(0)
    module = diffusion_module({"in_channels": 1, "out_channels": 1, "ch": 8, "ch_mult": [1], "num_res_blocks": 1,
                               "attn_resolutions": [], "dropout": 0.0, "image_size": 8, "num_groups": 4},
                              objective=ddpm(paper_betas(20)), val_bpd_images=0, loss_bins=10)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    logger = Recorded()
    trainer = L.Trainer(max_steps=6, callbacks=[LossByTLog()], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        accelerator="cpu", limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(images, batch_size=4))  # 2 steps an epoch: 3 epochs
    rows = read_loss_by_t(tmp_path / "loss_by_t.csv")
    logged = [m for _, m in logger.calls if any(k.startswith("train_loss_by_t/") for k in m)]
    assert [r["step"] for r in rows] == [2, 4, 6] and len(logged) == 3
    labels = [f"t{2 * k:04d}-{2 * k + 1:04d}" for k in range(10)]  # DDPM's bins of T=20, as they always were
    assert module.bin_labels == labels
    for row, metrics in zip(rows, logged, strict=True):
        expected = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("train_loss_by_t/")}
        assert set(row) - {"step"} == set(expected) <= set(labels)
        assert all(math.isclose(row[k], expected[k], rel_tol=1e-6) for k in expected)
    assert all(len(r) < 11 for r in rows)  # 8 draws an epoch leave bins empty: logged as nothing, not as before


def test_the_wandb_group_of_an_evaluate_sweep_whose_saved_folder_needs_hydras_resolver(tmp_path):
    """evaluate.py's sweep folder is saved as multirun/evaluate/${now:...}, which only Hydra resolves: the
    report takes the job folder's parent instead of failing with a traceback."""
    from omegaconf import OmegaConf

    from diffusion.run.reports.sweep import wandb_target

    hydra = OmegaConf.create({"mode": "MULTIRUN", "sweep": {"dir": "multirun/evaluate/${now:%Y-%m-%d_%H-%M-%S}"}})
    config = OmegaConf.create({"name": "evaluate", "logger": {"project": "diffusion", "group": None, "offline": True}})
    job = {"path": tmp_path / "2026-12-01_05-43-40" / "0_ema.sigma_rel=0.1", "hydra": hydra, "config": config}
    assert wandb_target([job]) == {"project": "diffusion", "group": "evaluate-2026-12-01_05-43-40", "offline": True}
