"""The wheel bundle (``.whl/``) that carries what the GPU suite needs beyond the GPU machine's image.

    python tests/gpu/bundle.py build --out .whl [--python 3.12]  # here: download, build, trim; MANIFEST.json, lock
    python tests/gpu/bundle.py lock --dir .whl          # here: rewrite tests/gpu/bundle-lock.json from .whl, no network
    python tests/gpu/bundle.py check                    # CI: the dry run of the install on the committed lock, offline
    python tests/gpu/bundle.py check --dir .whl         # here: the same dry run on the wheels themselves
    python3 tests/gpu/bundle.py install --dir .whl --target /tmp/site   # there: pip --no-index, then import

Ray core (its wheel less RAY_DROP, ELF files stripped of their symbol tables), a pure-python DeepSpeed wheel
(no ops built: they JIT-build on use), gguf, and each dependency of these that ``image-packages.txt`` lacks,
at its constraints.txt version, for CPython 3.12 on manylinux x86_64. ``bundle-lock.json`` (committed) records each
wheel's name, version, tags, Requires-Python, Requires-Dist, size and sha256, so CI checks the bundle with no wheels.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import compatible_tags, cpython_tags, parse_tag
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

log = logging.getLogger("bundle")
REPO = Path(__file__).resolve().parents[2]
IMAGE_LIST = Path(__file__).with_name("image-packages.txt")
LOCK = Path(__file__).with_name("bundle-lock.json")
CAP_BYTES = 60 * 2**20  # bundle + travelling tree; the device tool takes 64 MiB
# manylinux tags any glibc >= 2.28 runs (the image's Python 3.12.3 is Ubuntu 24.04's, glibc 2.39)
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
BUNDLE = {  # normalised name -> what it provides; each at its constraints.txt pin
    "ray": "Ray core: actors, placement groups, scheduling strategies (trimmed: RAY_DROP, stripped)",
    "deepspeed": "DeepSpeed ZeRO (pure-python wheel built with DS_BUILD_OPS=0; ops JIT-build on use)",
    "gguf": "GGUF checkpoints (transformers' GGUF loader: the SmolLM2 GGUF path)",
    "jsonschema": "ray: runtime_env validation",
    "jsonschema-specifications": "jsonschema: its meta-schemas",
    "referencing": "jsonschema: $ref resolution",
    "rpds-py": "jsonschema, referencing: persistent maps (binary)",
    "hjson": "deepspeed: config files",
    "pydantic": "deepspeed: config models",
    "pydantic-core": "pydantic: its validator (binary)",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic needs typing-extensions>=4.16; the image's version is not known",
}
# none of it runs for ray.init(include_dashboard=False), actors, placement groups (the dashboard runs --minimal)
RAY_DROP = ("ray/jars/", "ray/rllib/", "ray/data/", "ray/serve/", "ray/train/", "ray/tune/", "ray/llm/", "ray/air/",
            "ray/workflow/", "ray/includes/", "ray/cpp/", "ray/dashboard/client/", "ray/dashboard/modules/serve/",
            "ray/dashboard/modules/train/", "ray/dashboard/modules/data/")
RAY_DEAD_SCRIPTS = ("serve = ", "tune = ")  # console scripts into dropped packages
Lock = dict[str, Any]  # {"python", "total_bytes", "dists": [{"file", "name", "version", "tags", ...}]}


def _read_list(path: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        name, _, ver = line.split("#")[0].strip().partition("==")
        if name:
            out[canonicalize_name(name)] = ver.strip() or None
    return out


def pins(path: Path = REPO / "constraints.txt") -> dict[str, str]:
    """``{normalised name: version}`` of the lock's ``name==version`` lines."""
    return {k: v for k, v in _read_list(path).items() if v}


def image_packages(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """``{normalised name: version, None where not known}`` of the GPU image's packages."""
    return _read_list(path)


def _strip(data: bytes) -> bytes:
    """An ELF file less its symbol table and debug sections (``strip --strip-unneeded``)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in"), Path(tmp, "out")
        src.write_bytes(data)
        subprocess.run(["strip", "--strip-unneeded", "-o", str(dst), str(src)], check=True)
        return dst.read_bytes()


def trim_ray(wheel: Path, out_dir: Path) -> dict:
    """Repack Ray's wheel into ``out_dir`` (same name) less ``RAY_DROP``, ELF files stripped, RECORD rewritten.

    Args:
        wheel: Ray's wheel as downloaded.
        out_dir: Where the trimmed wheel goes.

    Returns:
        What was done: bytes dropped per path, stripped files, wheel sizes before and after.
    """
    strip = shutil.which("strip")
    if not strip:
        log.warning("no strip here (binutils): Ray's binaries keep their symbol tables (~35 MB more)")
    stripped, dropped, files = [], {}, []
    with zipfile.ZipFile(wheel) as src:
        dist_info = next(n.split("/")[0] for n in src.namelist() if n.split("/")[0].endswith(".dist-info"))
        for info in src.infolist():
            drop = next((d for d in RAY_DROP if info.filename.startswith(d)), None)
            if drop:
                dropped[drop] = dropped.get(drop, 0) + info.file_size
            elif not info.is_dir() and info.filename != f"{dist_info}/RECORD":
                data = src.read(info)
                if strip and data[:4] == b"\x7fELF":
                    data = _strip(data)
                    stripped.append(f"{info.filename}: {info.file_size} -> {len(data)}")
                elif info.filename == f"{dist_info}/entry_points.txt":
                    data = b"".join(ln for ln in data.splitlines(True) if not ln.decode().startswith(RAY_DEAD_SCRIPTS))
                files.append((info, data))
    record = []
    with zipfile.ZipFile(out_dir / wheel.name, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info, data in files:
            new = zipfile.ZipInfo(info.filename, info.date_time)
            new.external_attr = info.external_attr  # the raylet's and gcs_server's executable bits
            new.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(new, data, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{info.filename},sha256={digest},{len(data)}")
        dst.writestr(f"{dist_info}/RECORD", "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n")
    return {"dropped_uncompressed_bytes": dropped, "stripped": stripped,
            "wheel_bytes_before": wheel.stat().st_size, "wheel_bytes_after": (out_dir / wheel.name).stat().st_size}


def _pip(*args: str, env: dict | None = None) -> None:
    log.info("pip %s", " ".join(args))
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def build(out: Path, python: str, lock_path: Path = LOCK) -> dict:
    """Download, build and trim the bundle into ``out`` (its old wheels, tarballs and manifest removed first).

    Args:
        out: The bundle folder.
        python: The target CPython version: 3.12 (the GPU image's), another to try the trim here.
        lock_path: Where the bundle's lock goes (``write_lock``).

    Returns:
        The manifest, also written to ``out/MANIFEST.json``.

    Raises:
        RuntimeError: DeepSpeed's wheel came out platform-specific.
    """
    pinned = pins()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.whl"), *out.glob("*.tar.xz"), out / "MANIFEST.json"]:
        old.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
             *[a for p in PLATFORMS for a in ("--platform", p)], "-d", tmp,
             *[f"{n}=={pinned[n]}" for n in BUNDLE if n != "deepspeed"])
        (ray_wheel,) = Path(tmp).glob("ray-*.whl")
        trim = trim_ray(ray_wheel, out)
        ray_wheel.unlink()
        _pip("wheel", "-q", "--no-cache-dir", "--no-deps", "--no-build-isolation", "--no-binary", "deepspeed", "-w",
             tmp, f"deepspeed=={pinned['deepspeed']}", env={**os.environ, "DS_BUILD_OPS": "0"})
        (ds,) = Path(tmp).glob("deepspeed-*.whl")
        with zipfile.ZipFile(ds) as z:
            binaries = [n for n in z.namelist() if n.endswith((".so", ".pyd", ".dylib"))]
        if not ds.name.endswith("-py3-none-any.whl") or binaries:
            raise RuntimeError(f"{ds.name} is not pure python: {binaries[:3]}")
        for w in Path(tmp).glob("*.whl"):
            shutil.move(w, out / w.name)
    lock = lock_of(out, python)
    files = [{k: d[k] for k in ("file", "name", "version", "size", "sha256")} | {"provides": BUNDLE[d["name"]]}
             for d in sorted(lock["dists"], key=lambda d: d["file"])]
    manifest = {"python": python, "total_bytes": lock["total_bytes"], "files": files, "ray_trim": trim}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    write_lock(lock, lock_path)
    return manifest


def lock_of(folder: Path, python: str = "3.12") -> Lock:
    """The lock of the bundle in ``folder``: each distribution of its wheels and ``.tar.xz`` installed trees.

    Args:
        folder: The bundle folder.
        python: The target CPython version, where ``folder`` has no MANIFEST.json to say it.

    Returns:
        ``{"python", "total_bytes", "dists"}``; each dist (sorted by name) has its file's name, size and sha256, its
        tags (from the file name; a tarball's from its WHEEL), name, version, requires_python and requires_dist.
    """
    found = []  # (file, normalised name, version, tags, METADATA)
    for f in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(f.name)
        with zipfile.ZipFile(f) as z:
            meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            found.append((f, name, str(version), tags, z.read(meta).decode()))
    for f in sorted(folder.glob("*.tar.xz")):
        with tarfile.open(f) as t:
            texts = {m.name: t.extractfile(m).read().decode() for m in t.getmembers()
                     if m.isfile() and m.name.count("/") == 1 and m.name.endswith((".dist-info/WHEEL", "/METADATA"))}
        for name, wheel in texts.items():
            if name.endswith("/WHEEL"):
                msg = Parser().parsestr(meta := texts[name.replace("/WHEEL", "/METADATA")])
                tags = frozenset(tag for line in wheel.splitlines() if line.startswith("Tag:")
                                 for tag in parse_tag(line[4:].strip()))
                found.append((f, canonicalize_name(msg["Name"]), msg["Version"], tags, meta))
    stat = {f: (f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest()) for f in {x[0] for x in found}}
    dists = []
    for f, name, version, tags, meta in found:
        msg = Parser().parsestr(meta, headersonly=True)
        dists.append({"file": f.name, "name": name, "version": version, "tags": sorted(map(str, tags)),
                      "requires_python": msg["Requires-Python"], "requires_dist": msg.get_all("Requires-Dist") or [],
                      "size": stat[f][0], "sha256": stat[f][1]})
    manifest = folder / "MANIFEST.json"
    python = json.loads(manifest.read_text()).get("python", python) if manifest.exists() else python
    return {"python": python, "total_bytes": sum(size for size, _ in stat.values()),
            "dists": sorted(dists, key=lambda d: (d["name"], d["file"]))}


def write_lock(lock: Lock, path: Path = LOCK) -> None:
    """Write ``lock`` to ``path`` as stable JSON: keys sorted, one-space indent, a final newline."""
    path.write_text(json.dumps(lock, indent=1, sort_keys=True) + "\n")
    log.info("wrote %s: %d distributions, %d bytes", path, len(lock["dists"]), lock["total_bytes"])


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the rest of what travels to the device machine: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           check=True, capture_output=True).stdout.decode().split("\0")
    return sum(os.lstat(repo / n).st_size for n in names if n and os.path.lexists(repo / n))


def check_lock(lock: Lock, image: dict[str, str | None], tree: int, python: str = "3.12", cap: int = CAP_BYTES,
               pinned: dict[str, str] | None = None, size: int | None = None) -> list[str]:
    """The problems an install of the bundle that ``lock`` records would meet on the GPU image; no files read.

    Args:
        lock: The bundle's lock (``lock_of``, or ``write_lock``'s JSON).
        image: The image's packages (``image_packages()``).
        tree: Bytes of the rest of the travelling tree (``tree_bytes()``).
        python: The target CPython version.
        cap: The most bytes bundle and tree may have together.
        pinned: The versions the bundle must have where it pins them; None: constraints.txt's (``pins()``).
        size: The bundle's bytes; None: the sum of the sizes the lock records, one per file.

    Returns:
        One line per problem; empty when there is none.
    """
    major, minor = (int(x) for x in python.split("."))
    ok_tags = {*cpython_tags((major, minor), platforms=PLATFORMS),
               *compatible_tags((major, minor), f"cp{major}{minor}", PLATFORMS)}
    env = {"python_version": python, "python_full_version": f"{python}.3", "sys_platform": "linux", "extra": "",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    pinned = pins() if pinned is None else pinned
    dists, have = lock["dists"], {}
    problems = [] if lock["python"] == python else [f"the bundle is for Python {lock['python']}, not {python}"]
    for d in dists:
        file, name, version = d["file"], d["name"], d["version"]
        if name in have:
            problems.append(f"two wheels of {name} ({have[name]} and {version}, {file}): keep one")
        have[name] = version
        if not {t for s in d["tags"] for t in parse_tag(s)} & ok_tags:
            problems.append(f"{file}: no tag of it installs on CPython {python} manylinux x86_64")
        if name in pinned and Version(version) != Version(pinned[name]):
            problems.append(f"the bundle has {name} {version}, constraints.txt pins {name}=={pinned[name]} "
                            "(make gpu-bundle, then commit tests/gpu/bundle-lock.json)")
    for d in dists:
        name, needs = d["name"], d["requires_python"]
        if needs and not SpecifierSet(needs).contains(f"{python}.3"):
            problems.append(f"{name} requires Python {needs}")
        for req in map(Requirement, d["requires_dist"]):
            if req.marker and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            version = have.get(dep, image.get(dep))
            if dep not in have and dep not in image:
                problems.append(f"{name} requires {req}: {dep} is neither in the bundle nor in the image")
            elif version and not req.specifier.contains(version, prereleases=True):
                where = "bundle" if dep in have else "image"
                problems.append(f"{name} requires {req}: the {where} has {dep} {version}")
    size = sum({d["file"]: d["size"] for d in dists}.values()) if size is None else size
    if size + tree >= cap:
        problems.append(f"bundle {size / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB >= {cap / 2**20:.0f} MiB")
    return problems


def against_manifest(lock: Lock, manifest: Path, what: str) -> list[str]:
    """Where the files (name, sha256) of ``lock`` (of ``what``: a folder, a lock file) and ``manifest`` differ."""
    files = {d["file"]: d["sha256"] for d in lock["dists"]}
    listed = {f["file"]: f["sha256"] for f in json.loads(manifest.read_text())["files"]}
    problems = [f"{what}: {f} is not in {manifest.name} as it is" for f, sha in files.items() if listed.get(f) != sha]
    return problems + [f"{manifest.name} lists {f}, which {what} lacks" for f in listed if f not in files]


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def check_bundle(folder: Path, image: dict[str, str | None], tree: int, python: str = "3.12",
                 cap: int = CAP_BYTES, pinned: dict[str, str] | None = None) -> list[str]:
    """``check_lock`` on the wheels of ``folder`` (its size: all its files), which must be its MANIFEST.json's.

    Args:
        folder: The bundle folder.
        image, tree, python, cap, pinned: As for ``check_lock``.

    Returns:
        One line per problem; empty when there is none.
    """
    lock, size = lock_of(folder, python), _bytes(folder)
    problems = check_lock(lock, image, tree, python, cap, pinned, size)
    if (folder / "MANIFEST.json").exists():
        problems += [f"{p} (make gpu-bundle)" for p in against_manifest(lock, folder / "MANIFEST.json", folder.name)]
    return problems


def install(folder: Path, target: Path) -> str:
    """Install the bundle into ``target`` with no index (wheels, then tarballs), then import from there.

    Args:
        folder: The bundle folder.
        target: The folder to put first on PYTHONPATH.

    Returns:
        What imported: versions and where from.

    Raises:
        RuntimeError: One line saying what failed.
    """
    wheels, tars = sorted(folder.glob("*.whl")), sorted(folder.glob("*.tar.xz"))
    if not wheels and not tars:
        raise RuntimeError(f"no wheels or tarballs in {folder}")
    manifest = folder / "MANIFEST.json"
    built = json.loads(manifest.read_text())["python"] if manifest.exists() else None
    if built and built != f"{sys.version_info.major}.{sys.version_info.minor}":
        raise RuntimeError(f"{folder} was built for Python {built}, this is {sys.version.split()[0]}")
    if wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(target),
                               *map(str, wheels)], capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip() or done.stdout.strip() or "?").splitlines()[-1]
            raise RuntimeError(f"pip install of {len(wheels)} wheels into {target} failed: {last}")
    for t in tars:
        with tarfile.open(t) as tar:
            tar.extractall(target, filter="data")
    code = ("import ray, deepspeed, pydantic, gguf; from ray.util import placement_group, scheduling_strategies; "
            "print('ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'from', ray.__file__.rsplit('/', 2)[0])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode or not done.stdout.strip():
        raise RuntimeError(f"import from {target} failed: {(done.stderr.strip() or '?').splitlines()[-1]}")
    return done.stdout.strip().splitlines()[-1]


def _check(args: argparse.Namespace) -> int:
    """``check``: the dry run on the lock, or on ``--dir``'s wheels; then the lock against the folder's manifest."""
    folder, source = args.dir or REPO / ".whl", args.dir or args.lock
    if not source.exists():
        log.error("check FAILED: no %s (%s)", source, "make gpu-bundle" if args.dir else "bundle.py lock --dir .whl")
        return 1
    tree, image = tree_bytes(), image_packages(args.image)
    lock = json.loads(args.lock.read_text()) if args.lock.is_file() else None
    if args.dir:
        problems, size = check_bundle(args.dir, image, tree, args.python), _bytes(args.dir)
    else:
        problems, size = check_lock(lock, image, tree, args.python), lock["total_bytes"]
    if lock and (folder / "MANIFEST.json").is_file():
        problems += [f"{p} (bundle.py lock --dir {folder}; commit the lock)"
                     for p in against_manifest(lock, folder / "MANIFEST.json", args.lock.name)]
    for line in problems:
        log.error("check FAILED: %s", line)
    log.info("check: %s: %s, bundle %.1f MiB + tree %.1f MiB (cap %.0f MiB)", "FAILED" if problems else "OK",
             source, size / 2**20, tree / 2**20, CAP_BYTES / 2**20)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``build``, ``lock``, ``check`` or ``install``; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, build and trim the bundle; write its lock (needs the network, torch)")
    k = sub.add_parser("lock", help="write the lock of the bundle already in --dir (no network)")
    c = sub.add_parser("check", help="the dry run (requirements, pins, one version each, tags, size) on the lock, "
                       "or with --dir on a folder's wheels; and the lock against the folder's MANIFEST.json")
    i = sub.add_parser("install", help="pip install --no-index into --target, then import ray and deepspeed")
    b.add_argument("--out", type=Path, default=REPO / ".whl")
    for a in (k, i):
        a.add_argument("--dir", type=Path, default=REPO / ".whl")
    c.add_argument("--dir", type=Path, help="check this bundle folder's wheels instead of the lock (no default)")
    for a in (b, k, c):
        a.add_argument("--lock", type=Path, default=LOCK, help="the lock file (default: %(default)s)")
        a.add_argument("--python", default="3.12", help="target CPython version (the GPU image's: 3.12)")
    c.add_argument("--image", type=Path, default=IMAGE_LIST)
    i.add_argument("--target", type=Path, default=Path("/tmp/site"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.cmd == "build":
        log.info("built %s: %.1f MiB", args.out, build(args.out, args.python, args.lock)["total_bytes"] / 2**20)
        return 0
    if args.cmd == "check":
        return _check(args)
    if args.cmd == "lock":
        if not (lock := lock_of(args.dir, args.python))["dists"]:
            log.error("lock FAILED: no wheels in %s (make gpu-bundle)", args.dir)
            return 1
        write_lock(lock, args.lock)
        return 0
    try:
        log.info("installed: %s", install(args.dir, args.target))
    except (RuntimeError, OSError, tarfile.TarError, json.JSONDecodeError) as e:
        log.error("install FAILED: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
