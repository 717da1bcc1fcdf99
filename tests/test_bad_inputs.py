"""Issue 11's bad inputs, one test per cause: each is answered by one ``Error:`` line (or a
correct result), never a traceback, a silent wrong number or a lost file.

Each test reproduces a case the issue reported; the independent reference is the input
itself (the byte flipped, the row cut short) and what a correct answer must say about it.
"""

from __future__ import annotations

import os
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import make_image_csv
from _reliability import (
    Tiny,
    check_contract,
    check_run_folder,
    invoke,
    make_tiny,
    snapshot,
    temporaries,
)
from test_cache_integrity import flip_tensor_byte

from fairdeploy.data import load_splits
from fairdeploy.errors import FairDeployError
from fairdeploy.recipe import parse_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def proj(tiny: Tiny, tmp_path: Path) -> Tiny:
    """A fresh copy of the tiny project for one test."""
    return tiny.copy_to(tmp_path / "p")


def _edit(proj: Tiny, old: str, new: str, name: str = "r.yaml") -> Path:
    text = proj.recipe.read_text()
    assert old in text, old
    path = proj.root / name
    path.write_text(text.replace(old, new))
    return path


def _optimize(proj: Tiny, recipe: Path | None = None, ckpt: Path | None = None) -> tuple:
    before = snapshot(proj.root)
    out = invoke("optimize", ckpt or proj.ckpt, "--recipe", recipe or proj.recipe,
                 "--out", proj.root / "run", "--exports", proj.root / "exp", "--no-latency")
    return out, before


def _error(proj: Tiny, out, before, *phrases: str) -> str:
    """The call failed with one line naming ``phrases``, and changed nothing."""
    assert check_contract(out) == "error", out.text
    line = out.lines[-1]
    for p in phrases:
        assert p in line, (p, line)
    after = snapshot(proj.root, skip=(proj.root / "exp" / ".cache",))
    assert after == {k: v for k, v in before.items() if not k.startswith("exp/.cache")}
    assert not temporaries(proj.root)
    return line


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    ("old", "new", "phrase"),
    [
        ("kwargs: {in_features: 6", "kwargs: {nope: 1, in_features: 6", "unexpected keyword"),
        ("widths: [16, 16]", "widths: [-3, 16]", "negative dimension"),
        ("arch: mlp", "arch: 'os:getcwd'", "os:getcwd"),
        ("arch: mlp", "arch: 'fairdeploy:__version__'", "not a function"),
        ("arch: mlp", "arch: 'no_such_module_xyz:f'", "is not importable"),
    ],
)
def test_an_architecture_factory_that_raises_is_one_line(
    proj: Tiny, old: str, new: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")  # the recipes import test modules
    out, before = _optimize(proj, _edit(proj, old, new))
    _error(proj, out, before, "model.arch", phrase)


def test_a_model_larger_than_memory_is_refused_before_allocating(proj: Tiny) -> None:
    recipe = _edit(proj, "widths: [16, 16]", "widths: [16, 100000000000]")
    t0 = time.perf_counter()
    out = invoke("train", "--recipe", recipe, "-o", proj.root / "big.pt")
    assert check_contract(out) == "error" and "more than this machine's memory" in out.text
    assert time.perf_counter() - t0 < 30


# ------------------------------------------------------------------------------ checkpoints


def test_a_flipped_byte_in_a_checkpoint_is_caught_by_its_crc(proj: Tiny, tiny: Tiny) -> None:
    """Issue: the damaged checkpoint loaded and verify said PASSED on the wrong model."""
    flip_tensor_byte(proj.ckpt)
    damaged = torch.load(proj.ckpt, weights_only=True)["state_dict"]  # torch does not notice
    good = torch.load(tiny.ckpt, weights_only=True)["state_dict"]
    assert any(not torch.equal(damaged[k], good[k]) for k in good)
    out, before = _optimize(proj)
    _error(proj, out, before, "damaged", "CRC-32")
    # verify --checkpoint reads it through the same check.
    assert check_contract(invoke("optimize", tiny.ckpt, "--recipe", proj.recipe, "--out",
                                 proj.root / "ok", "--exports", proj.root / "exp",
                                 "--no-latency")) == "ok"
    out = invoke("verify", proj.root / "ok" / "model.onnx", "--checkpoint", proj.ckpt,
                 "--recipe", proj.recipe)
    assert check_contract(out, verify=True) == "error" and "CRC-32" in out.text


@pytest.mark.parametrize("flag", [0x01, 0x40])  # encrypted; strong encryption
def test_a_member_flagged_as_encrypted_is_a_damaged_checkpoint(proj: Tiny, flag: int) -> None:
    """Found by the thorough property profile: one flipped bit in a central-directory
    entry's flags makes zipfile raise RuntimeError ("is encrypted, password required"),
    which escaped as a traceback."""
    raw = bytearray(proj.ckpt.read_bytes())
    at = raw.index(b"PK\x01\x02")  # the first central-directory entry
    raw[at + 8] |= flag  # its general-purpose flags
    proj.ckpt.write_bytes(bytes(raw))
    out, before = _optimize(proj)
    _error(proj, out, before, "damaged")


def test_a_damaged_legacy_checkpoint_is_called_damaged(proj: Tiny) -> None:
    state = torch.load(proj.ckpt, weights_only=True)["state_dict"]
    legacy = proj.root / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    raw = bytearray(legacy.read_bytes())
    # Damage the pickle's opcode stream right after the magic number and protocol.
    raw[60] ^= 0xFF
    legacy.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="legacy"):
        out, before = _optimize(proj, ckpt=legacy)
    line = _error(proj, out, before, "damaged")
    assert "pickled Python objects" not in line


def test_sparse_quantized_and_integer_weights_are_refused(proj: Tiny) -> None:
    state = torch.load(proj.ckpt, weights_only=True)["state_dict"]
    for name, change, phrase in [
        ("sparse.pt", lambda t: t.to_sparse(), "sparse"),
        ("int.pt", lambda t: (t * 100).to(torch.int32), "int32"),
        ("nan.pt", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "non-finite"),
    ]:
        bad = dict(state)
        bad["layers.0.weight"] = change(bad["layers.0.weight"])
        torch.save(bad, proj.root / name)
        out, before = _optimize(proj, ckpt=proj.root / name)
        _error(proj, out, before, "layers.0.weight", phrase)


# ------------------------------------------------------------------------------------ data


def test_data_whose_width_does_not_fit_the_model(proj: Tiny) -> None:
    d = dict(np.load(proj.data))
    d["x"] = d["x"][:, :5]
    np.savez(proj.root / "narrow.npz", **d)
    out, before = _optimize(proj, _edit(proj, "path: data.npz", "path: narrow.npz"))
    _error(proj, out, before, "cannot take the inputs", "in_features")
    out = invoke("train", "--recipe", proj.root / "r.yaml", "-o", proj.root / "t.pt")
    assert check_contract(out) == "error" and "cannot take the inputs" in out.text


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda p, d: p.write_bytes(b""), "empty or cut short"),
        (lambda p, d: p.write_bytes(_npy_bytes(d["x"])), "single .npy array"),
        (lambda p, d: np.savez(p, **{**d, "x": d["x"][:, 0]}), "(samples, features)"),
        (lambda p, d: np.savez(p, **{k: v[:0] for k, v in d.items()}), "no rows"),
        (lambda p, d: np.savez(p, **{**d, "x": np.where(np.arange(len(d["x"]))[:, None] == 7,
                                                        np.nan, d["x"])}), "row 7"),
        (lambda p, d: np.savez(p, **{**d, "x": d["x"].astype(np.float64) * 1e300}), "float32"),
        (lambda p, d: np.savez(p, **{**d, "y": d["y"] * 10**9}), "class id"),
        (lambda p, d: p.write_bytes((p.parent / "data.npz").read_bytes()[:300]), "npz"),
    ],
    ids=["zero-bytes", "npy", "1d-x", "zero-rows", "nan", "overflow", "huge-class", "cut"],
)
def test_bad_npz_files(proj: Tiny, make, phrase: str) -> None:
    d = dict(np.load(proj.data))
    make(proj.root / "bad.npz", d)
    recipe = _edit(proj, "path: data.npz", "path: bad.npz")
    out, before = _optimize(proj, recipe)
    _error(proj, out, before, phrase)


def test_nan_features_are_blamed_on_the_data_not_the_selection(proj: Tiny) -> None:
    d = dict(np.load(proj.data))
    d["x"][3, 1] = np.inf
    np.savez(proj.root / "inf.npz", **d)
    out, before = _optimize(proj, _edit(proj, "path: data.npz", "path: inf.npz"))
    line = _error(proj, out, before, "non-finite", "row 3")
    assert "selection strategy" not in line


def _image_recipe(root: Path) -> dict:
    return {
        "model": {"arch": "mlp", "num_classes": 3, "kwargs": {"in_features": 192}},
        "data": {"kind": "image_csv", "csv": str(root / "labels.csv"), "split": {"mode": "column"},
                 "preprocessing": {"size": 10, "crop": 8}},
        "sensitive": {"attribute": "group", "groups": {"f": ["f"], "m": ["m"]}},
        "method": {"name": "truncated_svd", "layers": [{"layer": "layers.2", "rank": 2}]},
    }


@pytest.mark.parametrize(
    ("damage", "phrase"),
    [
        (lambda t: t.encode("latin-1") + "caf\xe9\n".encode("latin-1"), "not UTF-8"),
        (lambda t: (t + "imgs/000.jpg,1\n").encode(), "the row has 2 fields"),
        (lambda t: (t + 'imgs/000.jpg,"1,f,train\n').encode(), "unexpected end of data"),
        (lambda t: (t + "imgs/000.jpg,1,f," + "x" * 200_000 + "\n").encode(), "unterminated"),
        (lambda t: t.replace("path,label", "path,path").encode(), "appears twice"),
    ],
    ids=["latin-1", "short-row", "open-quote", "long-field", "repeated-column"],
)
def test_bad_image_csv_files_name_the_line(tmp_path: Path, damage, phrase: str) -> None:
    make_image_csv(tmp_path)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes(damage(csv_path.read_text()))
    with pytest.raises(FairDeployError, match=r"labels\.csv") as exc:
        load_splits(parse_recipe(_image_recipe(tmp_path)))
    assert phrase in str(exc.value)


def test_an_image_csv_with_a_byte_order_mark_reads_its_path_column(tmp_path: Path) -> None:
    make_image_csv(tmp_path)
    csv_path = tmp_path / "labels.csv"
    expected = load_splits(parse_recipe(_image_recipe(tmp_path)))
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # as Excel saves UTF-8
    got = load_splits(parse_recipe(_image_recipe(tmp_path)))
    for split in expected:
        assert got[split].sample_ids == expected[split].sample_ids


def _huge_png(path: Path, width: int, height: int) -> None:
    """A valid grayscale PNG of width × height zeros, written in compressed chunks."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))


def test_a_144_megapixel_image_is_a_bad_image_not_decoded(tmp_path: Path) -> None:
    from fairdeploy.serve import preprocess_image

    make_image_csv(tmp_path)
    rows = (tmp_path / "labels.csv").read_text().splitlines()
    first = rows[1].split(",")[0]
    _huge_png(tmp_path / first, 16_000, 9_000)
    recipe = _image_recipe(tmp_path)
    recipe["data"]["max_bad_images"] = 0.5
    t0 = time.perf_counter()
    splits = load_splits(parse_recipe(recipe))
    assert time.perf_counter() - t0 < 10  # decoding 144 MP would take far longer here
    assert sum(ds.skipped.get("bad_image", 0) for ds in splits.values()) == 1
    assert all(first not in ds.sample_ids for ds in splits.values())
    pre = {"resize": [10, 10], "crop": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]}
    with pytest.raises(FairDeployError, match="megapixel"):
        preprocess_image(tmp_path / first, pre)


# ---------------------------------------------------------------------------- recipe YAML


ALIAS_BOMB = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n"
    for i in range(9)
)


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        (lambda base: ALIAS_BOMB + base.replace("name: tiny", "name: *l8"), "aliases"),
        (lambda base: base.replace("name: tiny", "name: " + "[" * 100_000 + "]" * 100_000),
         "nests deeper"),
        (lambda base: base.replace("name: tiny", "name: &a [*a]"), "cycle"),
        (lambda base: base.replace("num_classes: 3", "num_classes: 1" + "0" * 5000), "digits"),
        (lambda base: base.replace("name: tiny", "name: 2024-13-45"), "month"),
        (lambda base: base + "#" * (1 << 20), "limit"),
    ],
    ids=["alias-bomb", "deep", "recursive", "huge-int", "bad-date", "huge-file"],
)
def test_hostile_yaml_is_refused_fast(proj: Tiny, text, phrase: str) -> None:
    (proj.root / "r.yaml").write_text(text(proj.recipe.read_text()))
    t0 = time.perf_counter()
    out, before = _optimize(proj, proj.root / "r.yaml")
    assert time.perf_counter() - t0 < 10
    _error(proj, out, before, phrase)


def test_opset_above_the_exporter_and_zero_tolerances(proj: Tiny) -> None:
    out, before = _optimize(proj, _edit(proj, "export: {", "export: {opset: 25, "))
    _error(proj, out, before, "export.opset", "use an opset from")
    recipe = _edit(proj, "export: {", "export: {tolerances: {atol: 0, rtol: 0}, ", "z.yaml")
    out, before = _optimize(proj, recipe)
    _error(proj, out, before, "export.tolerances", "atol")


def test_one_verification_sample_says_why_there_is_no_fairness(proj: Tiny) -> None:
    """Issue: verify_samples: 1 reported "group 'group 0' has no samples"."""
    out, _ = _optimize(proj, _edit(proj, "verify_samples: 40", "verify_samples: 1"))
    assert check_contract(out) == "ok"
    report = check_run_folder(proj.root / "run")
    note = report["verify"]["details"]["fairness_note"]
    assert "export.verify_samples" in note and "has no samples" not in note


# ---------------------------------------------------------------------------- verify/predict


@pytest.fixture(scope="module")
def shipped(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shipped") / "run"
    res = invoke("optimize", tiny.ckpt, "--recipe", tiny.recipe, "--out", out, "--exports",
                 out.parent / "exp", "--no-latency")
    assert check_contract(res) == "ok", res.text
    return out


def test_verify_with_a_reference_of_another_width(shipped: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "ref.npz", inputs=np.zeros((4, 5), np.float32),
             outputs=np.zeros((4, 3), np.float32))
    out = invoke("verify", shipped / "model.onnx", "--reference", tmp_path / "ref.npz")
    assert check_contract(out, verify=True) == "error" and "another model" in out.text
    np.savez(tmp_path / "empty.npz", inputs=np.zeros((0, 6), np.float32),
             outputs=np.zeros((0, 3), np.float32))
    out = invoke("verify", shipped / "model.onnx", "--reference", tmp_path / "empty.npz")
    assert check_contract(out, verify=True) == "error" and "no samples" in out.text


def test_verify_against_a_checkpoint_of_another_model(shipped: Path, tmp_path: Path) -> None:
    other = make_tiny(tmp_path / "other", d=4)  # takes 4 features, the ONNX model 6
    out = invoke("verify", shipped / "model.onnx", "--checkpoint", other.ckpt, "--recipe",
                 other.recipe)
    assert check_contract(out, verify=True) == "error" and "another model" in out.text


def test_predict_on_bad_rows_and_bad_metadata(shipped: Path, tmp_path: Path) -> None:
    import onnx

    np.save(tmp_path / "zero.npy", np.zeros((0, 6), np.float32))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    np.save(tmp_path / "nan.npy", np.full((2, 6), np.nan, np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((2, 6), np.float32))
    model = shipped / "model.onnx"
    for name, phrase in [("zero.npy", "no rows"), ("text.npy", "real numbers"),
                         ("nan.npy", "non-finite")]:
        out = invoke("predict", model, tmp_path / name)
        assert check_contract(out) == "error" and phrase in out.text, out.text
    proto = onnx.load(str(model))
    for p in proto.metadata_props:
        if p.key == "fairdeploy.preprocessing":
            p.value = "{not json"
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    out = invoke("predict", tmp_path / "bad.onnx", tmp_path / "ok.npy")
    assert check_contract(out) == "error" and "metadata" in out.text
    out = invoke("predict", model, tmp_path / "ok.npy")
    assert check_contract(out) == "ok" and len(out.lines) == 2


# ----------------------------------------------------------------------------------- train


def test_train_on_non_finite_data_or_a_diverging_run_fails_clearly(proj: Tiny) -> None:
    out = invoke("train", "--recipe", _edit(proj, "lr: 0.05", "lr: 1.0e+30"),
                 "-o", proj.root / "div.pt")
    assert check_contract(out) == "error" and "diverged" in out.text
    assert not (proj.root / "div.pt").exists() and not (proj.root / "div.pt.train").exists()


def test_resume_after_the_data_changed_at_the_same_path_and_size(proj: Tiny) -> None:
    args = ("train", "--recipe", proj.recipe, "-o", proj.root / "c.pt")
    assert check_contract(invoke(*args, "--epochs", "1")) == "ok"
    size = proj.data.stat().st_size
    d = dict(np.load(proj.data))
    d["y"] = (d["y"] + 1) % 3  # other labels, same file size
    np.savez(proj.data, **d)
    assert proj.data.stat().st_size == size
    out = invoke(*args, "--epochs", "2")
    assert check_contract(out) == "error" and "other data" in out.text and "--no-resume" in out.text
    assert check_contract(invoke(*args, "--epochs", "2", "--no-resume")) == "ok"
    meta = torch.load(proj.root / "c.pt", weights_only=True)["metadata"]
    assert [h["epoch"] for h in meta["history"]] == [1, 2]


def test_train_never_overwrites_a_file_that_is_not_its_checkpoint(proj: Tiny) -> None:
    before = proj.data.read_bytes()
    out = invoke("train", "--recipe", proj.recipe, "-o", proj.data, "--epochs", "1")
    assert check_contract(out) == "error" and "never overwritten" in out.text
    assert proj.data.read_bytes() == before
    # Its own checkpoint is replaced by a new run.
    assert check_contract(invoke("train", "--recipe", proj.recipe, "-o", proj.ckpt,
                                 "--epochs", "1", "--no-resume")) == "ok"


def test_verify_and_predict_refuse_a_model_changed_after_its_run(
    shipped: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(shipped, run)
    np.save(tmp_path / "ok.npy", np.zeros((2, 6), np.float32))
    assert check_contract(invoke("predict", run / "model.onnx", tmp_path / "ok.npy")) == "ok"
    st = (run / "model.onnx").stat()
    raw = bytearray((run / "model.onnx").read_bytes())
    raw[-40] ^= 0x01  # inside the last initializer or the metadata: ONNX has no checksum
    (run / "model.onnx").write_bytes(bytes(raw))
    os.utime(run / "model.onnx", ns=(st.st_atime_ns, st.st_mtime_ns))  # as bit rot would
    for args in (["verify", run / "model.onnx"], ["predict", run / "model.onnx",
                                                  tmp_path / "ok.npy"]):
        out = invoke(*args)
        assert check_contract(out, verify=True) == "error", out.text
        assert "changed after the run wrote it" in out.text


# ------------------------------------------------------------------------------ full disk


_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from fairdeploy.cli import main
main(sys.argv[2:])
"""


def test_a_full_disk_is_one_line_and_leaves_nothing(proj: Tiny) -> None:
    import subprocess
    import sys

    from _reliability import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = snapshot(proj.root)
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE, "3000", "optimize", str(proj.ckpt), "--recipe",
         str(proj.recipe), "--out", str(proj.root / "run"), "--exports",
         str(proj.root / "exp"), "--no-latency"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "Traceback" not in text and text.strip().splitlines()[-1].startswith("Error: ")
    assert "too large" in text.lower() or "disk" in text.lower()
    assert not temporaries(proj.root)
    assert not (proj.root / "run").exists()
    after = snapshot(proj.root, skip=(proj.root / "exp",))
    assert after == before


def test_zip_fixture_helper_flips_inside_a_record(tmp_path: Path) -> None:
    """The damage helper itself: one bit inside the first tensor record, CRC now wrong."""
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, tmp_path / "a.pt")
    flip_tensor_byte(tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as zf:
        assert zf.testzip() is not None
    w = torch.load(tmp_path / "a.pt", weights_only=True)["w"]
    assert int((w != torch.arange(64, dtype=torch.float32)).sum()) == 1


@pytest.mark.parametrize("message", ["first\nsecond", "  first  \n\n second\n", "\n"])
def test_a_multi_line_error_is_one_line_at_the_cli(message: str) -> None:
    """A FairDeployError whose text spans lines (one quoting another library's message, a
    user method's own) is printed as one ``Error:`` line, its lines joined by "; "."""
    import click
    from click.testing import CliRunner

    from fairdeploy.cli import _Group

    @click.group(cls=_Group)
    def group() -> None:
        pass

    @group.command()
    def fail() -> None:
        raise FairDeployError(message)

    r = CliRunner().invoke(group, ["fail"])
    assert r.exit_code == 1
    [line] = r.output.splitlines()
    want = "first; second" if message.strip() else "FairDeployError"
    assert line == f"Error: {want}"
