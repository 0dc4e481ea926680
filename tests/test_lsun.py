"""LSUN as released: `<category>_<split>_lmdb` databases written here in the real format (WebP records, a JPEG and a
PNG among them, keyed by 40 hex digits; torchvision's own LSUN reader reads them back), loaded center-cropped,
trained on through train.py, and every fault one line naming the database or the record's key."""

import contextlib
import hashlib
import io
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torchvision.datasets import LSUN

from diffusion.config import LSUNDataConfig, register_configs
from diffusion.data import LSUNDataModule
from diffusion.errors import UserError
from diffusion.run.jobs.precheck import CONF_DIR, check_composed, explained
from helpers import build, compose_cfg, run_script
from test_data import rgb_pattern

# (what the user has, a fragment of the one line it gets): collected for docs/bad_inputs.md
BAD_INPUT_CASES = [
    ("data=lsun data.category=bedroom, data.root holding church_outdoor's databases only",
     "data.category=bedroom: no database bedroom_train_lmdb under"),
    ("data=lsun data.category=churhc_outdoor", "data.category must be one of ['bedroom', 'bridge', 'church_outdoor',"),
    ("data=lsun, a record of church_outdoor_train_lmdb cut short", "records of LSUN database"),
    ("data=lsun, church_outdoor_val_lmdb not an LMDB database", "it is not an LMDB database, or is damaged"),
]
RUN = ["debug=fast", "logger=none", "callbacks.samples=null", "data=lsun", "model=digits", "data.image_size=8",
       "data.category=church_outdoor", "data.batch_size=4"]  # digits' small U-Net at 3×8×8
H, W = 10, 14  # every image: the center 10×10 square survives the crop


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """(H, W, 3) uint8 encoded as the release's records are: lossy WebP (or JPEG, or PNG)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, quality=90)
    return out.getvalue()


def write_database(path: Path, records: dict[bytes, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with lmdb.open(str(path), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key, value)


def write_lsun(root: Path, category: str = "church_outdoor", n: dict | None = None) -> dict[str, dict[bytes, bytes]]:
    """root/<category>_train_lmdb and _val_lmdb (default 6 and 2 images of H×W), as the release: WebP records
    keyed by hex ids, a JPEG and a PNG among them. Returns each split's records."""
    written = {}
    for split, count in (n or {"train": 6, "val": 2}).items():
        records = {}
        for i in range(count):
            fmt = {1: "JPEG", 2: "PNG"}.get(i, "WEBP") if split == "train" else "WEBP"
            key = hashlib.sha1(f"{category} {split} {i}".encode()).hexdigest().encode()
            records[key] = encode(rgb_pattern(H, W, 40 * i + (split == "val") * 17), fmt)
        write_database(root / f"{category}_{split}_lmdb", records)
        written[split] = records
    return written


def center_square(image: Image.Image) -> np.ndarray:
    """Recomputed here: the centered H×H square of an H×W RGB image, as uint8 (3, H, H)."""
    left = (W - H) // 2
    return np.asarray(image)[:, left:left + H].transpose(2, 0, 1)


def torchvision_images(root: Path, database: str) -> list[Image.Image]:
    """Every record of root/<database>_lmdb as torchvision's LSUN reader decodes it (PIL RGB), in its order."""
    theirs = LSUN(str(root), classes=[database])
    images = [theirs[i][0] for i in range(len(theirs))]
    theirs.dbs[0].env.close()  # LMDB opens an environment once per process: ours opens it next
    return images


def test_the_split_is_its_database_as_torchvision_reads_it_center_cropped(tmp_path, monkeypatch):
    root = tmp_path / "lsun"
    write_lsun(root)
    monkeypatch.chdir(tmp_path)  # torchvision's reader caches its key list in the working directory
    theirs = {split: torchvision_images(root, f"church_outdoor_{split}") for split in ("train", "val")}
    assert [len(images) for images in theirs.values()] == [6, 2]
    data = build(LSUNDataConfig, root=str(root), category="church_outdoor", batch_size=2, image_size=H)
    for split, images in theirs.items():
        ours = data.reference_images(split, 100)  # (N, 3, H, H) uint8
        assert ours.shape == (len(images), 3, H, H) and ours.dtype == torch.uint8
        for i, image in enumerate(images):
            np.testing.assert_array_equal(ours[i].numpy(), center_square(image), err_msg=f"{split} {i}")
    small = build(LSUNDataConfig, root=str(root), category="church_outdoor", batch_size=2, image_size=4)
    box = ((W - H) // 2, 0, (W - H) // 2 + H, H)  # the center square, resized bicubic (its filter reads past the box)
    want = np.asarray(theirs["val"][1].resize((4, 4), Image.Resampling.BICUBIC, box=box)).transpose(2, 0, 1)
    np.testing.assert_array_equal(small.reference_images("val", 2)[1].numpy(), want)
    assert small.identity["name"] == "LSUN church_outdoor" and small.identity["size"] == {"train": 6, "val": 2}


def test_train_py_trains_on_a_category(tmp_path):
    """Two steps through the real entry point, the images read by a DataLoader worker (its own LMDB handle)."""
    write_lsun(tmp_path / "lsun")
    out = tmp_path / "run"
    result = run_script("train.py", *RUN, f"data.root={tmp_path / 'lsun'}", "data.num_workers=1",
                        "trainer.max_steps=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 2
    assert checkpoint["data"]["name"] == "LSUN church_outdoor"
    assert checkpoint["data"]["size"] == {"train": 6, "val": 2}


def entry_point_error(tmp_path: Path, *overrides: str) -> str:
    """train.py's one line (exit status 2, no traceback) for these overrides."""
    result = run_script("train.py", *RUN, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_a_category_without_its_database_is_one_line(tmp_path):
    root = tmp_path / "lsun"
    write_lsun(root)
    line = entry_point_error(tmp_path, f"data.root={root}", "data.category=bedroom")
    assert line == (f"error: data.category=bedroom: no database bedroom_train_lmdb under {root} (expected "
                    f"{root / 'bedroom_train_lmdb'}); databases found there: church_outdoor_train_lmdb, "
                    "church_outdoor_val_lmdb; set data.category to a category found there, or data.root=PATH to "
                    "the folder holding bedroom_train_lmdb")
    assert BAD_INPUT_CASES[0][1] in line


def test_a_category_not_in_the_release_is_refused_before_anything_is_read(tmp_path):
    """train.py's check of the composed config, in this process (test_config_fuzz: the script prints the same)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*RUN, f"data.root={tmp_path}", "data.category=churhc_outdoor"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_status:
        explained("train", lambda: check_composed("train", cfg))
    assert exit_status.value.code == 2
    line = err.getvalue().strip()
    assert "\n" not in line and line.startswith(f"error: {BAD_INPUT_CASES[1][1]}")
    assert "got churhc_outdoor; give data.category one of" in line


def test_a_corrupt_record_is_named_by_its_key(tmp_path):
    root = tmp_path / "lsun"
    records = write_lsun(root)["train"]
    key = sorted(records)[3]  # the database's order is its keys'
    records[key] = records[key][: len(records[key]) // 2]
    write_database(root / "church_outdoor_train_lmdb", records)  # overwrites that record
    line = entry_point_error(tmp_path, f"data.root={root}")
    assert line.startswith(f"error: 1 of 6 {BAD_INPUT_CASES[2][1]} {root / 'church_outdoor_train_lmdb'} cannot be "
                           f"used, first key {key.decode()}: unreadable (")
    assert line.endswith("; fetch the database again (fyu/lsun's download.py) and unzip it there")


def setup_error(root: Path) -> str:
    with pytest.raises(UserError) as err:
        build(LSUNDataConfig, root=str(root), category="church_outdoor", batch_size=2).setup("fit")
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_database_that_is_not_lmdb_or_empty_or_a_missing_folder_is_one_line(tmp_path):
    root = tmp_path / "lsun"
    assert setup_error(root) == (f"LSUN folder {root} does not exist; set data.root=PATH to the folder holding "
                                 "church_outdoor_train_lmdb and church_outdoor_val_lmdb (as the release unzips)")
    write_lsun(root, n={"train": 4})
    (root / "church_outdoor_val_lmdb").mkdir()
    (root / "church_outdoor_val_lmdb" / "data.mdb").write_bytes(b"\x00" * 4096)
    message = setup_error(root)
    assert message.startswith(f"LSUN database {root / 'church_outdoor_val_lmdb'} cannot be opened (")
    assert BAD_INPUT_CASES[3][1] in message
    (root / "church_outdoor_val_lmdb" / "data.mdb").unlink()
    write_database(root / "church_outdoor_val_lmdb", {})
    assert setup_error(root) == (f"LSUN database {root / 'church_outdoor_val_lmdb'} has 0 records; fetch the "
                                 "database again (fyu/lsun's download.py) and unzip it there")


@pytest.mark.parametrize("experiment, category, random_flip", [("lsun_church_256", "church_outdoor", True),
                                                                 ("lsun_bedroom_256", "bedroom", False)])
def test_the_papers_lsun_recipes_read_the_released_databases(experiment, category, random_flip, tmp_path):
    data = instantiate(compose_cfg("train", [f"experiment={experiment}"], tmp_path).data)
    assert isinstance(data, LSUNDataModule) and (data.category, data.image_size, data.channels) == (category, 256, 3)
    assert data.root == Path("data/lsun") and data.random_flip == random_flip
