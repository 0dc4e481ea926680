"""Do the samplers draw the same images as an earlier version of the code? Every sampler setting below draws 16
images from the same checkpoint, seed and chunking with this checkout and with REV (a git worktree of it, run in its
own process), and the largest pixel difference is printed per setting and written to bench/results/.

    python bench/same_images.py outputs/digits/<time>/checkpoints/last.ckpt            # against 9d440e0
    python bench/same_images.py CKPT --base <rev>

9d440e0 is the last commit before objectives became a layer (its API: diffusion.checkpointing.load_module, the module's
`diffusion`, diffusion.sampling.draw); a newer REV takes this checkout's API (--same-api).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPECS = [dict(name="ddpm"), dict(name="ddim", steps=50), dict(name="ddim", steps=10, eta=0.5),
         dict(name="ddim", steps=20, spacing="trailing"), dict(name="respaced", steps=50),
         dict(name="respaced", steps=20, spacing="logsnr"), dict(name="dpmpp_2m", steps=10),
         dict(name="dpmpp_2m", steps=10, spacing="karras"), dict(name="dpmpp_2m_sde", steps=10),
         dict(name="dpmpp_2m_sde", steps=20, eta=0.5, spacing="trailing"), dict(name="unipc", steps=10),
         dict(name="unipc", steps=5, order=2, spacing="linspace"), dict(name="heun", steps=19),
         dict(name="heun", steps=9, spacing="logsnr"), dict(name="ddim", steps=50, clip_denoised=False),
         dict(name="dpmpp_2m", steps=20, clip_denoised=False)]  # fmt: skip

OLD_API = """
import json, sys, torch
from diffusion.checkpointing import load_module
from diffusion.sampling import SamplerSpec, draw
torch.set_num_threads(2)
module = load_module(sys.argv[1])
specs = json.loads(sys.argv[3])
torch.save([draw(module.net, module.diffusion, SamplerSpec(**s), 16, shape=module.net.image_shape, seed=0,
                 chunk_size=8).images for s in specs], sys.argv[2])
"""
NEW_API = """
import json, sys, torch
from diffusion.core.sampling import SamplerSpec, draw
from diffusion.lightning.checkpoints import load_module
torch.set_num_threads(2)
module = load_module(sys.argv[1])
specs = json.loads(sys.argv[3])
torch.save([draw(module.net, module.objective, SamplerSpec(**s).check().check_for(module.objective), 16,
                 shape=module.net.image_shape, seed=0, chunk_size=8).images for s in specs], sys.argv[2])
"""


def images(src: Path, code: str, ckpt: Path, out: Path) -> list[torch.Tensor]:
    """The images of every setting, drawn by the package under `src` in a process of its own."""
    subprocess.run([sys.executable, "-c", code, str(ckpt), str(out), json.dumps(SPECS)], check=True,
                   env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--base", default="9d440e0")
    parser.add_argument("--same-api", action="store_true", help="REV has this checkout's API")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), args.base],
                       check=True)
        try:
            old = images(tree / "src", NEW_API if args.same_api else OLD_API, args.ckpt.resolve(), Path(tmp) / "o.pt")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
        new = images(ROOT / "src", NEW_API, args.ckpt.resolve(), Path(tmp) / "n.pt")
    rows = [{"sampler": spec, "max_abs_difference": (a - b).abs().max().item()}
            for spec, a, b in zip(SPECS, old, new, strict=True)]
    for row in rows:
        print(f"{row['max_abs_difference']:.2e}  {row['sampler']}")
    worst = max(row["max_abs_difference"] for row in rows)
    print(f"largest difference over {len(rows)} settings × 16 images: {worst:.2e} (images in [-1, 1])")
    out = ROOT / "bench" / "results" / "same_images.json"
    out.write_text(json.dumps({"base": args.base, "checkpoint": str(args.ckpt), "rows": rows}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
