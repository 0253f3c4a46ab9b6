"""Run bookkeeping: canonical hashes, atomic writes, environment records, a cache.

Every file a run leaves behind is written atomically: the bytes go to a
temporary file in the same folder, which is flushed, fsync'ed and then renamed
over the target with `os.replace`. A reader therefore sees either the old file,
or no file, or the complete new file; a sweep killed at any moment leaves no
half-written `summary.json` that would be read as a finished run. The one
exception is `append_jsonl` (metrics logs), whose last line may be cut short by
a kill; `read_jsonl` skips such a line.

`cached` computes an expensive artefact (a pretrained network) once across
processes that share a file system, under an `fcntl` lock.

Limitations: the lock uses `fcntl.flock`, so `cached` is POSIX-only (on other
systems it runs without a lock, and two processes may both compute); on network
file systems it is as reliable as their `flock` emulation (Linux NFSv4: yes).
"""

import contextlib
import datetime
import functools
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


T = TypeVar("T")
PathLike = str | os.PathLike


def canonical_json(obj: Any) -> str:
    """The canonical JSON of `obj`: sorted keys, no spaces (hash input)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_hash(obj: Any) -> str:
    """The sha256 hex digest of `canonical_json(obj)` (a run's identity)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _atomic_target(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success.

    The temporary name keeps the target's suffix (some writers, e.g. `np.save`,
    append one otherwise) and is removed if the writer raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}"
    )
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform.
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (temporary file, fsync, rename)."""
    with _atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """`torch.save(obj, path)`, atomically."""
    import torch

    with _atomic_target(path) as tmp:
        torch.save(obj, tmp)


def read_json(path: PathLike) -> Any:
    """Read a JSON file written by `atomic_write_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: PathLike, record: dict) -> None:
    """Append `record` as one JSON line to `path` and flush it.

    The line goes out in one `write` call on a file opened in append mode, so
    lines from one writer never interleave; a kill may still cut the last line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as file:
        file.write(line)
        file.flush()


def read_jsonl(path: PathLike) -> list[dict]:
    """Read the records of a JSON-lines file, skipping a cut-short last line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise
    return records


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """The commit of the git checkout holding this package, or None."""
    folder = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}"


def env_record() -> dict:
    """Where and with what a run ran: versions, git commit, device, host, time."""
    import numpy
    import torch

    from .. import __version__

    return {
        "sparse_rtrl": __version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": _device(),
        "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


@contextlib.contextmanager
def file_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `path` (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def cached(
    path: PathLike,
    compute: Callable[[], T],
    load: Callable[[Path], T],
    save: Callable[[Path, T], None],
) -> T:
    """Compute a value once across processes, keeping it at `path`.

    Under an exclusive lock on `path + ".lock"`: if `path` exists, return
    `load(path)`; otherwise `value = compute()`, `save(tmp, value)` to a
    temporary file beside `path` that is then renamed onto it (so a kill never
    leaves a partial artefact), and return `value`. Concurrent callers wait for
    the first one and then load its result.

    Args:
        path: where the artefact lives (its folder is created).
        compute: builds the value; called at most once per artefact.
        load: reads the value back from a path.
        save: writes the value to the path it is given.

    Returns:
        The computed or loaded value.
    """
    path = Path(path)
    with file_lock(f"{path}.lock"):
        if path.exists():
            return load(path)
        value = compute()
        with _atomic_target(path) as tmp:
            save(tmp, value)
        return value
