"""Precision, torch.compile, gradient accumulation and channels_last through the real training path."""

import lightning as L
import pytest
import torch

from diffusion.lightning.checkpoints import load_module
from diffusion.run.commands.train import train
from helpers import run_script, train_cfg

FAST = ["logger=none", "callbacks.samples=null", "trainer.max_steps=2"]


class Probe(L.Callback):
    """Records what the network saw and returned during training steps, and how many steps there were."""

    def __init__(self):
        self.out_dtypes, self.batches, self.compiled, self.precision = set(), 0, None, None

    def on_fit_start(self, trainer, pl_module):
        self.precision = trainer.precision
        pl_module.net.register_forward_hook(lambda m, args, out: self.out_dtypes.add(out.dtype) if m.training else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        self.compiled = getattr(pl_module.net, "_compiled_call_impl", None) is not None


def _raw_weights(out):
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["current_model_state"]


def test_bf16_mixed_runs_the_net_under_autocast(tmp_path):
    probe = Probe()
    metrics = train(train_cfg(tmp_path, *FAST, "trainer.precision=bf16-mixed"), extra_callbacks=(probe,))
    assert probe.precision == "bf16-mixed" and probe.out_dtypes == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert all(v.dtype == torch.float32 for v in _raw_weights(tmp_path).values())  # fp32 master weights


def test_fp16_mixed_on_cpu_is_a_one_line_error(tmp_path):
    result = run_script("train.py", "debug=fast", "logger=none", "trainer.precision=16-mixed", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: trainer.precision=16-mixed needs a CUDA GPU (fp16 autocast with gradient scaling), got "
        "trainer.accelerator=cpu; use trainer.precision=bf16-mixed on CPU"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_mixed_on_gpu_scales_gradients(tmp_path):
    probe = Probe()
    train(train_cfg(tmp_path, *FAST, "trainer.accelerator=gpu", "trainer.precision=16-mixed"),
              extra_callbacks=(probe,))
    assert probe.out_dtypes == {torch.float16}


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    # 2 micro-batches of 16 per optimizer step against 32 at once: same images, same (t, ε), same update.
    probe = Probe()
    train(train_cfg(tmp_path / "acc", *FAST, "data.batch_size=16", "trainer.accumulate_grad_batches=2"),
              extra_callbacks=(probe,))
    train(train_cfg(tmp_path / "big", *FAST, "data.batch_size=32"))
    assert probe.batches == 4  # 2 optimizer steps × 2 micro-batches
    big = _raw_weights(tmp_path / "big")
    for key, value in _raw_weights(tmp_path / "acc").items():
        torch.testing.assert_close(value, big[key], rtol=1e-4, atol=1e-5, msg=key)


def test_channels_last_trains_like_channels_first(tmp_path):
    train(train_cfg(tmp_path / "nhwc", *FAST, "model.channels_last=true"))
    train(train_cfg(tmp_path / "nchw", *FAST))
    nchw = _raw_weights(tmp_path / "nchw")
    for key, value in _raw_weights(tmp_path / "nhwc").items():
        torch.testing.assert_close(value.contiguous(), nchw[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_compile_trains_the_compiled_net_and_saves_plain_weights(tmp_path):
    probe = Probe()
    # A thin net without attention: inductor's compile time grows with the graph, and it is the same code path.
    metrics = train(train_cfg(tmp_path, *FAST, "training.compile=true", "model.ch=8", "model.attn_resolutions=[]"),
                        extra_callbacks=(probe,))
    assert probe.compiled and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert not any("_orig_mod" in key for key in _raw_weights(tmp_path))
    net = load_module(str(tmp_path / "checkpoints" / "last.ckpt")).net  # loads into an uncompiled net
    assert net(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)).shape == (1, 1, 8, 8)
