"""What a run's config records is what ran: a precision Lightning would silently change is refused, and so are a
"conditional" model that never sees a label and guidance of a model that never learned the unconditional pass."""

import re

import pytest
import torch

from diffusion.config import validate
from diffusion.errors import UserError
from diffusion.run.commands.evaluate import evaluate
from diffusion.run.commands.figures import figures
from diffusion.run.commands.train import train
from helpers import compose_cfg, run_script, train_cfg


def last_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                    reason="accelerator=auto finds a GPU here, where 16-mixed is what runs")
def test_16_mixed_with_accelerator_auto_and_no_gpu_is_refused_before_anything_runs(tmp_path):
    """Lightning would fall back to bf16-mixed on the CPU while the run's config says 16-mixed."""
    result = run_script("train.py", "debug=fast", "logger=none", "trainer.accelerator=auto",
                        "trainer.precision=16-mixed", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    line = last_line(result)
    assert line.startswith("error: trainer.precision=16-mixed needs a GPU, but trainer.accelerator=auto finds none")
    assert "use trainer.precision=bf16-mixed" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
    validate(train_cfg(tmp_path, "trainer.accelerator=auto", "trainer.precision=bf16-mixed"))  # the fix passes


def test_a_conditional_model_that_drops_every_label_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"training.cond_drop_prob=1.0 replaces every label .* would never see a label"):
        validate(train_cfg(tmp_path, "model.num_classes=10", "training.cond_drop_prob=1.0"))
    validate(train_cfg(tmp_path, "model.num_classes=10", "training.cond_drop_prob=0.99"))


@pytest.fixture(scope="module")
def never_unconditional(tmp_path_factory):
    """A class-conditional checkpoint trained with cond_drop_prob=0: its "no label" input was never trained."""
    out = tmp_path_factory.mktemp("cond0")
    train(train_cfg(out, "model.num_classes=10", "training.cond_drop_prob=0", "logger=none", "callbacks.samples=null",
                    "trainer.max_steps=1", "validation.bpd_images=0"))
    return out / "checkpoints" / "last.ckpt"


REASON = re.escape("mixes in the unconditional pass, which this model never learned (trained with "
                   "training.cond_drop_prob=0")


def test_guidance_of_a_model_that_never_learned_the_unconditional_pass_is_refused_everywhere(never_unconditional,
                                                                                              tmp_path):
    ckpt = never_unconditional
    line = last_line(run_script("sample.py", f"ckpt={ckpt}", "sampler.guidance_scale=2",
                                f"output_dir={tmp_path / 's'}", cwd=tmp_path))
    assert re.match(f"error: sampler.guidance_scale=2 {REASON}", line), line
    assert not (tmp_path / "s" / "samples.npz").exists()
    common = [f"ckpt={ckpt}", "logger=none", "sampler.name=ddim", "sampler.steps=2"]
    with pytest.raises(UserError, match=re.escape("guidance_table=[0.0, 2.0] ") + REASON):  # w = 0: unconditional
        evaluate(compose_cfg("evaluate", [*common, "bpd.enabled=false", "guidance_table=[0,2]"], tmp_path / "e"))
    with pytest.raises(UserError, match=f"sampler.guidance_scale=1.5 {REASON}"):
        evaluate(compose_cfg("evaluate", [*common, "bpd.enabled=false", "sampler.guidance_scale=1.5"], tmp_path / "e2"))
    with pytest.raises(UserError, match=f"sampler.guidance_scale=1.5 {REASON}"):
        figures(compose_cfg("figures", [*common, "sampler.guidance_scale=1.5"], tmp_path / "f"))
    with pytest.raises(UserError, match=f"callbacks.samples.sampler.guidance_scale=2 {REASON}"):
        validate(train_cfg(tmp_path, "model.num_classes=10", "training.cond_drop_prob=0",
                           "callbacks.samples.sampler.guidance_scale=2"))
    # w = 1 is the conditional model alone: no unconditional pass, nothing to refuse
    validate(train_cfg(tmp_path, "model.num_classes=10", "training.cond_drop_prob=0",
                       "callbacks.samples.sampler.guidance_scale=1"))
