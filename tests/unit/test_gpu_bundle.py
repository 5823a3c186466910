"""``tests/gpu/bundle.py check``: the dry run of the GPU machine's install, on synthetic wheels and on the committed
lock (``tests/gpu/bundle-lock.json``: CI checks the real bundle with no wheels); no network."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tests.gpu import bundle

REPO = Path(__file__).resolve().parents[2]
IMAGE = {"numpy": "2.5.2", "torch": "2.11.0", "packaging": None}


def wheel(folder: Path, name: str, version: str, *requires: str, tag: str = "py3-none-any",
          python: str | None = None) -> Path:
    """Write a minimal wheel whose METADATA has ``requires`` as its Requires-Dist lines."""
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Python: {python}"] if python else []
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
        z.writestr(f"{name}/__init__.py", "")
    return path


def check(folder: Path, tree: int = 0, **kw) -> list[str]:
    return bundle.check_bundle(folder, IMAGE, tree, **kw)


def test_a_requirement_that_neither_bundle_nor_image_has_fails_naming_it(tmp_path):
    wheel(tmp_path, "foo", "1.0", "numpy>=2", "hjson")
    problems = check(tmp_path)
    assert len(problems) == 1 and "hjson" in problems[0] and "foo" in problems[0], problems


def test_requirements_met_by_the_image_or_the_bundle_pass(tmp_path):
    wheel(tmp_path, "foo", "1.0", "numpy>=2", "packaging>=24", "torch>=2.0", "bar==2.*",
          'missing; extra == "dev"', 'missing2; python_version < "3.10"', 'missing3; sys_platform == "win32"')
    wheel(tmp_path, "bar", "2.1", "numpy")
    assert check(tmp_path) == []


def test_a_version_the_image_or_bundle_does_not_meet_fails(tmp_path):
    wheel(tmp_path, "foo", "1.0", "numpy<2", "bar>=3")
    wheel(tmp_path, "bar", "2.1")
    problems = check(tmp_path)
    assert len(problems) == 2, problems
    assert any("image has numpy 2.5.2" in p for p in problems) and any("bundle has bar 2.1" in p for p in problems)


def test_two_versions_of_one_name_fail(tmp_path):
    wheel(tmp_path, "foo", "1.0")
    wheel(tmp_path, "Foo", "1.1")
    problems = check(tmp_path)
    assert problems and "two wheels of foo" in problems[0], problems


@pytest.mark.parametrize("tag", ["cp312-cp312-macosx_11_0_arm64", "cp311-cp311-manylinux_2_17_x86_64",
                                 "cp312-cp312-manylinux_2_17_aarch64", "cp312-cp312-manylinux_2_34_x86_64",
                                 "py2-none-any"])
def test_a_wheel_that_does_not_install_on_cpython_312_manylinux_x86_64_fails(tmp_path, tag):
    wheel(tmp_path, "foo", "1.0", tag=tag)
    problems = check(tmp_path)
    assert len(problems) == 1 and "no tag of it installs" in problems[0], problems


@pytest.mark.parametrize("tag", ["cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64",
                                 "cp39-abi3-manylinux_2_28_x86_64", "py3-none-any", "cp312-none-any"])
def test_compatible_tags_pass(tmp_path, tag):
    wheel(tmp_path, "foo", "1.0", tag=tag)
    assert check(tmp_path) == []


def test_requires_python_is_checked(tmp_path):
    wheel(tmp_path, "foo", "1.0", python=">=3.13")
    assert "requires Python >=3.13" in check(tmp_path)[0]


def test_bundle_and_tree_over_the_cap_fail(tmp_path):
    wheel(tmp_path, "foo", "1.0")
    assert check(tmp_path, tree=1000, cap=10**6) == []
    problems = check(tmp_path, tree=10**6, cap=10**6)
    assert len(problems) == 1 and "MiB" in problems[0], problems
    assert any("MiB" in p for p in check(tmp_path, tree=bundle.CAP_BYTES))


def test_a_file_that_is_not_the_manifests_fails(tmp_path):
    w = wheel(tmp_path, "foo", "1.0")
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"files": [{"file": w.name, "sha256": "0" * 64}]}))
    assert "not in MANIFEST.json" in check(tmp_path)[0]


def test_the_image_list_and_the_lock_cover_the_bundle():
    image, lock = bundle.image_packages(), bundle.pins()
    assert image["torch"] == "2.11.0" and "aiohttp" in image and image["packaging"] is None
    assert set(bundle.BUNDLE) & set(image) == {"typing-extensions"}  # carried only for its version
    assert [n for n in bundle.BUNDLE if n not in lock] == []


@pytest.mark.skipif(not (REPO / ".whl" / "MANIFEST.json").exists(), reason="no .whl/MANIFEST.json: make gpu-bundle")
def test_the_real_bundle_passes_check():
    python = json.loads((REPO / ".whl" / "MANIFEST.json").read_text())["python"]
    assert bundle.check_bundle(REPO / ".whl", bundle.image_packages(), bundle.tree_bytes(), python) == []


def committed() -> dict:
    """A fresh copy of the committed lock."""
    return json.loads(bundle.LOCK.read_text())


def dist(lock: dict, name: str) -> dict:
    return next(d for d in lock["dists"] if d["name"] == name)


def check_lock(lock: dict, image: dict | None = None, tree: int = 0, **kw) -> list[str]:
    """``check_lock`` on the image's list, pinning nothing unless told: a bumped pin fails only the committed lock."""
    return bundle.check_lock(lock, bundle.image_packages() if image is None else image, tree, **{"pinned": {}, **kw})


def test_the_committed_lock_passes_check_offline():
    lock = committed()
    assert lock["python"] == "3.12" and sorted(d["name"] for d in lock["dists"]) == sorted(bundle.BUNDLE)
    assert lock["total_bytes"] == sum(d["size"] for d in lock["dists"])
    assert bundle.LOCK.read_text() == json.dumps(lock, indent=1, sort_keys=True) + "\n"  # as write_lock writes it
    assert bundle.check_lock(lock, bundle.image_packages(), bundle.tree_bytes()) == []
    assert bundle.main(["check"]) == 0  # the CLI's default: the committed lock (and .whl/MANIFEST.json, if built)


def test_a_lock_off_the_constraints_pin_fails_naming_the_package(tmp_path):
    lock, pin = committed(), bundle.pins()["ray"]
    dist(lock, "ray")["version"] = "1.0.0"
    problems = [p for p in check_lock(lock, pinned=bundle.pins()) if "ray" in p]
    assert len(problems) == 1 and "ray 1.0.0" in problems[0] and f"ray=={pin}" in problems[0], problems
    assert check_lock(lock) == []
    bundle.write_lock(lock, tmp_path / "lock.json")
    assert bundle.main(["check", "--lock", str(tmp_path / "lock.json")]) == 1


def test_a_lock_entry_needing_what_the_image_lacks_fails():
    lock, image = committed(), bundle.image_packages()
    dist(lock, "deepspeed")["requires_dist"].append("not-in-image>=1")
    problems = check_lock(lock, image)
    assert len(problems) == 1 and "deepspeed requires not-in-image>=1" in problems[0], problems
    del image["torch"]
    assert any("deepspeed requires torch>=2.0.0: torch is neither" in p for p in check_lock(lock, image))


def test_a_lock_over_the_cap_by_its_recorded_sizes_fails():
    lock = committed()
    total = lock["total_bytes"]
    assert check_lock(lock, tree=0, cap=total + 1) == []
    assert "MiB" in check_lock(lock, tree=1, cap=total + 1)[0]
    dist(lock, "ray")["size"] += bundle.CAP_BYTES
    problems = check_lock(lock)
    assert len(problems) == 1 and "MiB >= 60 MiB" in problems[0], problems


def test_a_lock_for_another_python_fails():
    lock = committed()
    lock["python"] = "3.11"
    assert check_lock(lock) == ["the bundle is for Python 3.11, not 3.12"]


def test_lock_records_a_folder_and_check_lock_reads_it(tmp_path):
    w = wheel(tmp_path, "foo", "1.0", "numpy>=2", tag="cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64",
              python=">=3.10")
    assert bundle.main(["lock", "--dir", str(tmp_path), "--lock", str(tmp_path / "lock.json")]) == 0
    lock = json.loads((tmp_path / "lock.json").read_text())
    assert lock == bundle.lock_of(tmp_path) and lock["python"] == "3.12"
    assert lock["dists"] == [{"file": w.name, "name": "foo", "version": "1.0", "requires_python": ">=3.10",
                              "tags": ["cp312-cp312-manylinux2014_x86_64", "cp312-cp312-manylinux_2_17_x86_64"],
                              "requires_dist": ["numpy>=2"], "size": w.stat().st_size,
                              "sha256": bundle.hashlib.sha256(w.read_bytes()).hexdigest()}]
    assert bundle.check_lock(lock, IMAGE, 0, pinned={"foo": "1.0"}) == []
    assert "constraints.txt pins foo==1.1" in bundle.check_lock(lock, IMAGE, 0, pinned={"foo": "1.1"})[0]
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"files": [{"file": w.name, "sha256": "0" * 64}]}))
    assert bundle.against_manifest(lock, tmp_path / "MANIFEST.json", "lock.json") == [
        f"lock.json: {w.name} is not in MANIFEST.json as it is"]
    assert bundle.main(["lock", "--dir", str(tmp_path / "none"), "--lock", str(tmp_path / "l2.json")]) == 1


@pytest.mark.skipif(not (REPO / ".whl" / "MANIFEST.json").exists(), reason="no .whl/MANIFEST.json: make gpu-bundle")
def test_the_committed_lock_is_the_built_bundles():
    assert bundle.against_manifest(committed(), REPO / ".whl" / "MANIFEST.json", "bundle-lock.json") == []
    assert bundle.lock_of(REPO / ".whl") == committed()


def test_a_tarball_of_an_installed_tree_is_checked_like_a_wheel(tmp_path):
    import io
    import tarfile

    files = {"foo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nTag: cp312-cp312-manylinux_2_17_x86_64\n",
             "foo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: foo\nVersion: 1.0\nRequires-Dist: nothere\n"}
    with tarfile.open(tmp_path / "foo-1.0.tar.xz", "w:xz") as t:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            t.addfile(info, io.BytesIO(text.encode()))
    problems = check(tmp_path)
    assert len(problems) == 1 and "nothere" in problems[0], problems


def test_install_refuses_an_empty_folder_and_a_bundle_for_another_python(tmp_path):
    with pytest.raises(RuntimeError, match="no wheels"):
        bundle.install(tmp_path, tmp_path / "site")
    wheel(tmp_path, "foo", "1.0")
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"python": "2.7", "files": []}))
    with pytest.raises(RuntimeError, match="built for Python 2.7"):
        bundle.install(tmp_path, tmp_path / "site")
    assert bundle.main(["install", "--dir", str(tmp_path), "--target", str(tmp_path / "site")]) == 1
