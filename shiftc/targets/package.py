"""``shiftc package``: one folder to copy onto a 64-bit Arm Linux board and run there.

    DIR/
      model.so                       the model library (compiled here for aarch64, weights inside)
      lib/libtvm_runtime.so          the TVM runtime, from the aarch64 wheels of the SAME apache-tvm
      lib/libtvm_ffi.so                and apache-tvm-ffi versions as installed here
      lib/libshiftc_runtime.so       shiftc's C++ runtime (csrc/runtime), cross-built with CMake
      lib/cmake/shiftc/              find_package(shiftc) for apps built against the package
      bin/shiftc_run                 the example app (csrc/examples), RUNPATH $ORIGIN/../lib
      include/shiftc/runtime.h       the C++ API
      share/shiftc/examples/         the example's source
      README.md                      how to run it on the board, the model's inputs and outputs
      shiftc-package.json            versions, target, files and sizes

How: the aarch64 wheels are fetched once with ``pip download --platform manylinux_2_28_aarch64``
into ``~/.cache/shiftc/wheels`` (or taken from a folder given with ``--wheels`` / ``SHIFTC_WHEELS``
for offline machines); libtvm_runtime and libtvm_ffi are unpacked from them; the C++ runtime and the
example are built from shiftc's source tree with ``cmake/aarch64-toolchain.cmake`` (headers from the
installed tvm-ffi wheel, libraries from the aarch64 one) and installed with ``cmake --install``.
That install tree depends only on the sources, the TVM versions and the compiler, so it is kept in
``~/.cache/shiftc/runtime/<hash>`` and reused. Everything is assembled in a temporary folder beside
DIR and renamed into place at the end: a failure leaves no half-written package.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

from ..errors import BadInputError, UnsupportedError, UsageError
from ..paths import cache_dir
from ..progress import log, step

PACKAGE_TARGETS = ("aarch64",)
MANIFEST = "shiftc-package.json"
WHEELS_ENV = "SHIFTC_WHEELS"  # a folder with pre-downloaded aarch64 wheels (offline machines)
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
# distribution -> the runtime library it contributes (path inside the wheel)
RUNTIME_LIBS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}
EM_AARCH64 = 183
_ELF_MACHINES = {3: "x86 (32-bit)", 40: "Arm (32-bit)", 62: "x86-64", 183: "AArch64", 243: "RISC-V"}
# Sources whose content decides the cached runtime build.
_RUNTIME_SOURCES = ("CMakeLists.txt", "cmake", "csrc/runtime", "csrc/examples", "csrc/include")


class ToolchainError(UnsupportedError):
    """A tool, wheel or source tree needed to build the package is missing; the message says how to
    get it."""


@dataclass
class PackageResult:
    path: str
    target: str
    cpu: str | None
    task: str
    model_bytes: int
    runtime_bytes: int
    seconds: float
    versions: dict
    requires: dict
    files: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.runtime_bytes

    def to_json(self) -> dict:
        return {
            **{k: getattr(self, k) for k in ("path", "target", "cpu", "task")},
            "size_bytes": {"model": self.model_bytes, "runtime": self.runtime_bytes, "total": self.total_bytes},
            "versions": self.versions,
            "requires": self.requires,
            "files": self.files,
            "seconds": round(self.seconds, 2),
        }


def package(model: str | os.PathLike, output: str | os.PathLike, *, target: str = "aarch64", cpu: str | None = None,
            wheels: str | os.PathLike | None = None) -> PackageResult:
    """Write the self-contained board folder ``output`` for ``model`` (an .onnx, compiled here for
    the target, or a model library already compiled for it). ``wheels``: a folder holding the
    aarch64 apache-tvm / apache-tvm-ffi wheels (default: ``$SHIFTC_WHEELS``, else downloaded)."""
    from . import get_target

    t0 = time.perf_counter()
    if target not in PACKAGE_TARGETS:
        raise UsageError(f"--target '{target}': shiftc package builds for {', '.join(PACKAGE_TARGETS)} only")
    spec = get_target(target, cpu=cpu)
    model, output = os.fspath(model), os.path.abspath(os.fspath(output))
    meta = _check_model(model, cpu)
    _check_output(output)
    source = _source_tree()
    cmake = _check_tools(spec)
    versions = _tvm_versions()
    wheel_files = _aarch64_wheels(versions, wheels)

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=parent)
    try:
        runtime = _runtime_tree(source, spec, cmake, versions, wheel_files)
        shutil.copytree(runtime, stage, symlinks=True, dirs_exist_ok=True)
        model_so = os.path.join(stage, "model.so")
        if meta is None:
            from ..backend.compile import compile_model

            meta = compile_model(model, model_so, target=target, cpu=cpu).metadata
        else:
            shutil.copyfile(model, model_so)
        files = _file_sizes(stage)
        runtime_bytes = sum(n for f, n in files.items() if f == "bin/shiftc_run" or (f.startswith("lib/") and f.endswith(".so")))
        requires = _requirements(stage, spec)
        result = PackageResult(output, target, cpu, meta.get("task", "custom"), files["model.so"], runtime_bytes,
                               0.0, versions, requires)
        _write(os.path.join(stage, "README.md"), _readme(os.path.basename(output), meta, spec, result))
        manifest = {"format": 1, "shiftc_version": _shiftc_version(), "target": target, "cpu": cpu,
                    "tvm_target": spec.tvm, "source": os.path.basename(model), "task": result.task,
                    "versions": versions, "requires": requires, "files": files,
                    "size_bytes": result.to_json()["size_bytes"]}
        _write(os.path.join(stage, MANIFEST), json.dumps(manifest, indent=2) + "\n")
        result.files = _file_sizes(stage)
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp made it 0700
        _move_into_place(stage, output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - t0
    return result


# -- checks -------------------------------------------------------------------------------------


def _check_model(model: str, cpu: str | None) -> dict | None:
    """None for an .onnx (compiled later); the embedded metadata of an aarch64 model library."""
    if not os.path.isfile(model):
        raise BadInputError(f"'{model}' does not exist")
    if model.endswith(".onnx"):
        return None
    if not model.endswith(".so"):
        raise BadInputError(f"'{model}': expected an .onnx file or a model library (.so) compiled with --target aarch64")
    if cpu is not None:
        raise UsageError(f"--cpu applies when compiling an .onnx; '{model}' is already compiled")
    machine = elf_machine(model)
    if machine != EM_AARCH64:
        raise BadInputError(
            f"'{model}' is a library for {_ELF_MACHINES.get(machine, f'ELF machine {machine}')}, not AArch64; "
            "compile the .onnx with `shiftc compile M.onnx -o m.so --target aarch64`, or package the .onnx"
        )
    meta = embedded_metadata(model)
    if meta is None:
        raise BadInputError(f"'{model}' is not a shiftc model library (no embedded shiftc metadata)")
    return meta


def elf_machine(path: str) -> int:
    """The e_machine field of an ELF file (183 = AArch64, 62 = x86-64)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise BadInputError(f"'{path}' is not a shared library (no ELF header)")
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def embedded_metadata(path: str) -> dict | None:
    """The JSON that ``shiftc compile`` embeds (``shiftc_metadata``), read from the file's bytes,
    for libraries that cannot be loaded on this machine. TVM stores the uint8 constant verbatim."""
    from ..backend.compile import LIBRARY_FORMAT

    key = b'{"format": %d, "shiftc_version": ' % LIBRARY_FORMAT
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = data.rfind(key)
        if at < 0:
            return None
        end = data.find(b"\x00", at)
        text = data[at:end if end > 0 else len(data)].decode("utf-8", errors="replace")
    try:
        meta, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _check_output(output: str) -> None:
    if os.path.isfile(output) or (os.path.isdir(output) and os.listdir(output)
                                  and not os.path.isfile(os.path.join(output, MANIFEST))):
        raise UsageError(f"-o '{output}' exists and is not a shiftc package; choose a new folder or remove it")


def _source_tree() -> str:
    root = os.environ.get("SHIFTC_SOURCE_DIR") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not all(os.path.exists(os.path.join(root, p)) for p in ("CMakeLists.txt", "csrc/runtime", "csrc/examples")):
        raise ToolchainError(
            f"shiftc package builds the C++ runtime from shiftc's source tree, not found at '{root}'; install shiftc "
            "from a checkout (`pip install --no-build-isolation -e .`) or set SHIFTC_SOURCE_DIR to one"
        )
    return root


def _check_tools(spec) -> str:
    if spec.cross_cc and shutil.which(spec.cross_cc) is None:
        raise ToolchainError(
            f"shiftc package --target {spec.name} needs the cross compiler '{spec.cross_cc}' "
            "(Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"
        )
    cmake = shutil.which("cmake")
    if cmake is None:
        raise ToolchainError("shiftc package needs cmake >= 3.24 (apt-get install cmake, or pip install cmake)")
    return cmake


def _tvm_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {dist: version(dist) for dist in RUNTIME_LIBS}
    except PackageNotFoundError as exc:
        raise ToolchainError(f"shiftc package needs the installed {exc.name} wheel (pip install {exc.name})") from None


# -- the aarch64 wheels ---------------------------------------------------------------------------


def download_command(versions: dict, dest: str) -> list[str]:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", WHEEL_PLATFORM,
            "--python-version", py, "-d", dest, *(f"{d}=={v}" for d, v in versions.items())]


def _pip_text(cmd: list[str]) -> str:
    """``python -m pip download ...`` as a user types it."""
    return "pip " + " ".join(shlex.quote(a) for a in cmd[3:])


def _find_wheels(folder: str, versions: dict) -> dict:
    """dist -> path of an aarch64 Linux wheel of exactly that version in ``folder``."""
    found = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        parts = name[:-len(".whl")].split("-") if name.endswith(".whl") else []
        if len(parts) < 5:
            continue
        dist = parts[0].lower().replace("_", "-")
        if versions.get(dist) == parts[1] and "linux" in parts[-1] and "aarch64" in parts[-1]:
            found.setdefault(dist, os.path.join(folder, name))
    return found


def _aarch64_wheels(versions: dict, wheels: str | os.PathLike | None) -> dict:
    explicit = os.fspath(wheels) if wheels is not None else os.environ.get(WHEELS_ENV) or None
    folder = explicit or os.path.join(cache_dir(), "wheels")
    found = _find_wheels(folder, versions)
    missing = {d: v for d, v in versions.items() if d not in found}
    if not missing:
        return found
    wanted = ", ".join(f"{d}=={v}" for d, v in missing.items())
    if explicit:
        raise ToolchainError(
            f"no aarch64 wheel of {wanted} in '{explicit}'; fetch them on a machine with network access with "
            f"`{_pip_text(download_command(versions, explicit))}`"
        )
    os.makedirs(folder, exist_ok=True)
    cmd = download_command(missing, folder)
    with step(f"downloading the aarch64 wheels of {wanted} into {folder}"):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            failed = proc.returncode != 0
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            failed, detail = True, [str(exc)]
    found = _find_wheels(folder, versions)
    if failed or len(found) < len(versions):
        raise ToolchainError(
            f"could not download the aarch64 wheels of {wanted} (needs network access to PyPI): {' '.join(detail)}. "
            f"Offline: run `{_pip_text(download_command(versions, 'WHEELS'))}` on a machine with network access, "
            f"then pass --wheels WHEELS (or set {WHEELS_ENV}=WHEELS)"
        )
    return found


def _unpack_runtime_libs(wheel_files: dict, dest: str) -> None:
    """libtvm_runtime.so / libtvm_ffi.so out of the aarch64 wheels, at their wheel paths under dest."""
    for dist, member in RUNTIME_LIBS.items():
        target = os.path.join(dest, member)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            with zipfile.ZipFile(wheel_files[dist]) as z, z.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
        except KeyError:
            raise ToolchainError(f"the wheel '{wheel_files[dist]}' has no {member}") from None
        except zipfile.BadZipFile:
            raise ToolchainError(f"'{wheel_files[dist]}' is not a valid wheel (zip); delete it and retry") from None
        if elf_machine(target) != EM_AARCH64:
            raise ToolchainError(f"{member} in '{wheel_files[dist]}' is not an AArch64 library")


# -- the C++ runtime and example, cross-built ---------------------------------------------------


def _runtime_key(source: str, spec, versions: dict) -> str:
    h = hashlib.sha256(json.dumps([spec.tvm.get("mtriple"), spec.cross_cc, versions]).encode())
    compiler = spec.cross_cc or os.environ.get("CXX", "c++")
    try:
        h.update(subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout.encode())
    except OSError:
        pass
    for top in _RUNTIME_SOURCES:
        root = os.path.join(source, top)
        paths = [root] if os.path.isfile(root) else sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        for p in paths:
            h.update(os.path.relpath(p, source).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def _runtime_tree(source: str, spec, cmake: str, versions: dict, wheel_files: dict) -> str:
    """The installed runtime tree (bin/, lib/, include/, share/) for the target, built with CMake
    once per (sources, TVM versions, compiler) and cached."""
    cache = os.path.join(cache_dir(), "runtime")
    tree = os.path.join(cache, f"{spec.tvm.get('mtriple', spec.name)}-{_runtime_key(source, spec, versions)}")
    if os.path.isfile(os.path.join(tree, "bin", "shiftc_run")):
        log(f"reusing the {spec.name} runtime built in {tree}")
        return tree
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shiftc-package-") as tmp, step(f"building the C++ runtime for {spec.name}"):
        wheels_dir, build, install = (os.path.join(tmp, d) for d in ("wheels", "build", "install"))
        _unpack_runtime_libs(wheel_files, wheels_dir)
        # Headers (arch-independent) from the installed tvm-ffi wheel: same version as the libraries.
        import importlib.util

        os.symlink(os.path.join(importlib.util.find_spec("tvm_ffi").submodule_search_locations[0], "include"),
                   os.path.join(wheels_dir, "tvm_ffi", "include"))
        configure = [cmake, "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_INSTALL_LIBDIR=lib",
                     "-DSHIFTC_BUILD_RUNTIME=ON", "-DSHIFTC_BUILD_PYTHON=OFF", "-DSHIFTC_INSTALL_TVM_RUNTIME=ON",
                     f"-DTVM_WHEEL_DIR={wheels_dir}/tvm", f"-DTVM_FFI_WHEEL_DIR={wheels_dir}/tvm_ffi"]
        if shutil.which("ninja"):
            configure[1:1] = ["-G", "Ninja"]
        if spec.cross_cc:
            configure.append(f"-DCMAKE_TOOLCHAIN_FILE={os.path.join(source, 'cmake', 'aarch64-toolchain.cmake')}")
        jobs = str(max(1, min(len(os.sched_getaffinity(0)), 8)))
        for cmd in (configure, [cmake, "--build", build, "--target", "shiftc_run", "--parallel", jobs],
                    [cmake, "--install", build, "--prefix", install, "--strip"]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise ToolchainError(f"building the {spec.name} runtime failed: {' '.join(cmd)}\n{tail}")
        try:
            os.replace(install, tree)
        except OSError:  # another process cached the same build meanwhile
            if not os.path.isfile(os.path.join(tree, "bin", "shiftc_run")):
                raise
    return tree


def _requirements(stage: str, spec) -> dict:
    """Newest glibc / libstdc++ (GLIBCXX_) symbol versions the package's binaries need (from readelf):
    {"glibc": "2.34", "glibcxx": "3.4.29"}; empty where no readelf is installed."""
    triple = spec.tvm.get("mtriple", "")
    readelf = shutil.which(f"{triple}-readelf") or shutil.which("readelf")
    if readelf is None:
        return {}
    paths = [os.path.join(stage, "bin", "shiftc_run"), os.path.join(stage, "model.so")]
    paths += sorted(os.path.join(stage, "lib", f) for f in os.listdir(os.path.join(stage, "lib")) if f.endswith(".so"))
    proc = subprocess.run([readelf, "-V", "--wide", *paths], capture_output=True, text=True)
    need = {}
    for lib, ver in re.findall(r"\b(GLIBC|GLIBCXX)_(\d+(?:\.\d+)*)\b", proc.stdout):
        key = tuple(int(x) for x in ver.split("."))
        if key > need.get(lib, ()):
            need[lib] = key
    return {k.lower(): ".".join(map(str, v)) for k, v in sorted(need.items())}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# -- assembling -----------------------------------------------------------------------------------


def _move_into_place(stage: str, output: str) -> None:
    """Rename the finished folder to ``output``; an earlier package (or an empty folder) there is
    replaced, with the old one moved aside first so a failure keeps one complete package."""
    old = None
    if os.path.isdir(output):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".old", dir=os.path.dirname(output))
        os.rmdir(old)
        os.rename(output, old)
    try:
        os.rename(stage, output)
    except OSError:
        if old:
            os.rename(old, output)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _file_sizes(folder: str) -> dict:
    return dict(sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
                       for d, _, names in os.walk(folder) for f in names))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _umask() -> int:
    from ..frontend.onnx_io import _umask as umask

    return umask()


def _shiftc_version() -> str:
    from .. import __version__

    return __version__


def _dims(t: dict) -> str:
    return "[" + ", ".join(str(d) for d in t["shape"]) + "]"


def _readme(name: str, meta: dict, spec, r: PackageResult) -> str:
    task = r.task
    sig = [f"    input  {t['name']:<28} {t['dtype']:<8} {_dims(t)}" for t in meta.get("inputs", [])]
    sig += [f"    output {t['name']:<28} {t['dtype']:<8} {_dims(t)}" for t in meta.get("outputs", [])]
    if len(sig) > 12:
        sig = sig[:10] + [f"    ... {len(sig) - 10} more (./bin/shiftc_run info model.so lists all)"]
    needs = " and ".join(f"{ {'glibc': 'glibc', 'glibcxx': 'libstdc++ (GLIBCXX_)'}[k]} {v} or newer"
                         for k, v in r.requires.items())
    lines = [
        f"# {name}: a shiftc model for {spec.description}",
        "",
        f"Built by shiftc {_shiftc_version()} from `{meta.get('source', 'model.onnx')}` (task: {task}). Copy this whole folder",
        "to the board (`scp -r`, rsync, a USB stick); nothing else is needed there: no Python, no TVM install.",
        f"It needs 64-bit Arm Linux{' with ' + needs if needs else ''} (check with `ldd --version`).",
        "",
        "| file | what |",
        "|---|---|",
        f"| `model.so` | the model, weights inside ({_mb(r.model_bytes)}) |",
        f"| `lib/libtvm_runtime.so`, `lib/libtvm_ffi.so` | TVM runtime (apache-tvm {r.versions['apache-tvm']}, "
        f"apache-tvm-ffi {r.versions['apache-tvm-ffi']}, aarch64 wheels) |",
        "| `lib/libshiftc_runtime.so`, `include/shiftc/runtime.h` | shiftc's C++ runtime and its API |",
        "| `bin/shiftc_run` | the example app; its source is `share/shiftc/examples/shiftc_run.cc` |",
        "| `lib/cmake/shiftc/` | `find_package(shiftc)` for your own app |",
        "",
        f"Runtime {_mb(r.runtime_bytes)} + model {_mb(r.model_bytes)} = {_mb(r.total_bytes)}.",
        "",
        "## Run",
        "",
        "In this folder (the programs find `lib/` through their RUNPATH `$ORIGIN/../lib`):",
        "",
        "```sh",
        "./bin/shiftc_run info model.so                      # inputs, outputs, task",
    ]
    if task == "image-classification":
        lines.append("./bin/shiftc_run classify model.so image.f32 --top 5  # image.f32: raw float32 NCHW, preprocessed")
    if task == "causal-lm":
        lines.append("./bin/shiftc_run lm model.so --tokens 1,2,3 --steps 32  # token ids in, greedy token ids out")
    lines += [
        "./bin/shiftc_run dump model.so inputs.bin outputs.bin  # any model: tensors in, all outputs out",
        "```",
        "",
        "`--threads N` sets the size of the thread pool (default: every core, or `TVM_NUM_THREADS=N`).",
        "`inputs.bin` / `outputs.bin` are SHT1 tensor files: `\"SHT1\"`, u32 count, then per tensor u32 length +",
        "name, u32 length + dtype, u32 ndim, i64 dims[ndim], u64 nbytes, raw little-endian data.",
    ]
    if task == "causal-lm":
        lines += ["`lm` prefills the prompt, then decodes greedily with the KV cache and prints the token ids and",
                  "tokens/s; turn text into ids and back with the model's tokenizer on any machine."]
    lines += ["", "Inputs and outputs (names in shapes are symbolic dimensions, set by the inputs you pass):", "", *sig, "",
              "## Your own C++ app", "",
              "`include/shiftc/runtime.h` documents the API (`shiftc::Model::Load`, `SetInput`, `Run`, `Output`,",
              "`shiftc::LMSession` for KV-cache decoding). With CMake, on the board or cross-compiling on the host",
              "with shiftc's `cmake/aarch64-toolchain.cmake`:", "",
              "```cmake",
              "find_package(shiftc 0.1 CONFIG REQUIRED)   # -DCMAKE_PREFIX_PATH=/path/to/this/folder",
              "add_executable(app main.cc)",
              "target_link_libraries(app PRIVATE shiftc::runtime)",
              "```", "",
              "Without CMake: `g++ -std=c++17 main.cc -Iinclude -Llib -lshiftc_runtime -o app`. Run it with",
              "`LD_LIBRARY_PATH=lib ./app model.so`, or link with `-Wl,-rpath,'$ORIGIN/../lib'` and put it in `bin/`.", ""]
    return "\n".join(lines)
