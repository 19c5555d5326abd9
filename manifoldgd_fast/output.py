"""Atomic writing of the distilled set: per-class folders, latents, manifest.

A class is written into ``OUT/.<class>.tmp-<pid>/`` and renamed to
``OUT/<class>/`` only when complete, so a killed run leaves either a finished
class or nothing; a rerun skips finished classes (SPEC 6). Every file goes
through temp + ``os.replace``. One run at a time writes into ``OUT``
(:class:`RunLock`), which lets it sweep the temp files that killed runs left.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .data import IMAGE_EXTS
from .errors import DataError
from .shipped import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONTACT_SHEET = "contact_sheet.png"
LATENTS_DIR = "latents"
MODES_DIR = "modes"
RESERVED_DIRS = (LATENTS_DIR, MODES_DIR)  # what a run puts beside the class folders: no class may take these names
DONE_MARK = ".complete"
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"  # atomic_write_bytes's temp files
MANIFEST_LOCK = ".lock-manifest"   # held while the manifest is rewritten (shards, a whole run, eval / metrics)
MANIFEST_RECORDS = ("eval", "metrics")  # the lists the `eval` / `metrics` commands add to a run's manifest
DATA_STAMPS = "data_stamps"  # the done mark's digest of the class's image files as distilled
SHARDS_HOLD = "processes of a --shard K/N run"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which would race with other threads
# (the PNG writer, the mode prefetcher) creating files meanwhile.
_UMASK = _read_umask()


def _umask_mode(target, mode: int, *, exact: bool = False) -> None:
    """chmod ``target`` (a path or a descriptor) to ``mode`` less the umask (``exact``: ``mode`` itself); a file
    system that keeps no modes (some CIFS / FUSE mounts refuse chmod: EPERM, ENOTSUP) leaves the file as it
    made it, and the write goes on."""
    try:
        (os.fchmod if isinstance(target, int) else os.chmod)(target, mode if exact else mode & ~_UMASK)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def fsync_folder(folder: str) -> None:
    """Flush ``folder``'s entries (a rename into it) to disk: without it a power cut after the rename
    can lose the file's new name, or give back its old contents. Best effort: a file system that
    cannot sync a folder (some network and FUSE mounts refuse) is left as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + rename (both on disk once it returns)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:  # a file written over keeps its mode (a chmod 0640 eval.json stays so), as open(path, "w") keeps it
        st = os.lstat(path)
        keep = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None  # (a link is replaced, not followed)
    except OSError:
        keep = None
    # the target's name in the temp's: an independent shard can tell (and sweep) its own classes' leftovers
    # (cut, in bytes, where a long name would take the temp's name past the file system's 255 bytes: never a
    # class's, whose names data.scan_image_folder holds to CLASS_NAME_BYTES)
    try:
        # (surrogateescape: a path given on the command line need not be UTF-8; 5 + 230 + 1 + 8 random <= 255)
        stem = os.path.basename(path).encode("utf-8", "surrogateescape")[:230].decode("utf-8", "ignore")
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{stem}-", dir=folder)
    except OSError as e:  # named by the file asked for, not by the temp's random name
        raise type(e)(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as f:  # (first: the descriptor is closed whatever fails next)
            if hasattr(os, "fchmod"):  # mkstemp makes 0600 files: give the usual umask's mode, as open() would
                _umask_mode(f.fileno(), 0o666 if keep is None else keep, exact=keep is not None)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, e.strerror, path) from None
        raise


def _remove_entry(path: str, ignore_errors: bool = False) -> None:
    """Remove ``path``: a folder with what it holds; a file or a link (to a folder too: rmtree refuses one,
    silently with ``ignore_errors``) unlinked, its target kept."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        os.unlink(path)


STALE_TEMP_S = 3600  # a temp file or folder untouched this long was left by a killed process, not being written


def sweep_stale_temps(folder: str, prefixes: tuple[str, ...] = (TMP_PREFIX,), older_than: float = STALE_TEMP_S) -> list[str]:
    """Remove ``folder``'s temps (names starting with one of ``prefixes``) not modified for ``older_than`` s:
    what killed processes left in a folder that several may write at once without a lock (the latent
    cache, the digits export), where a fresh temp may be another process's write in flight. Returns them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not name.startswith(prefixes):
            continue
        path = os.path.join(folder, name)
        try:
            if now - os.lstat(path).st_mtime < older_than:
                continue
            _remove_entry(path)
        except OSError:
            continue  # gone meanwhile (another sweep), or not ours to remove
        removed.append(path)
    return removed


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_folder_atomically(dest: str, fill: Callable[[str], Any]) -> str:
    """Build a folder with ``fill(tmp)`` in a temp folder beside ``dest``, then rename it into place.

    Whatever ``dest`` held before is moved aside and removed only once the new folder is in place:
    a kill leaves the old folder or the new one, never a half-written one (a kill between the two
    renames leaves the old one aside, in ``.<name>.old-*/``, and the next call puts it back first;
    the ``.<name>.tmp-`` folder a kill leaves is swept by the next call once stale). Modes are the umask's, as
    ``os.makedirs`` / ``open`` would give (mkdtemp and safetensors make owner-only ones). Returns ``dest``.
    """
    dest = os.path.abspath(dest)
    parent, name = os.path.dirname(dest), os.path.basename(dest)
    os.makedirs(parent, exist_ok=True)
    if not os.path.lexists(dest):  # a call killed between its two renames: the old folder is put back first
        for aside in sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.old-*", name))):
            with contextlib.suppress(OSError):
                os.replace(aside, dest)
                break
    sweep_stale_temps(parent, (f".{name}.tmp-", f".{name}.old-"))
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        fill(tmp)
        for dirpath, _, filenames in os.walk(tmp):  # (os.walk does not enter linked folders)
            _umask_mode(dirpath, 0o777)
            for f in filenames:
                if os.path.islink(os.path.join(dirpath, f)):  # a link fill made: not its target's mode to set
                    continue
                _umask_mode(os.path.join(dirpath, f), 0o666)
                with open(os.path.join(dirpath, f), "rb") as fh:  # renamed into place only once on disk
                    os.fsync(fh.fileno())
        old = None
        if os.path.lexists(dest):  # moved aside, and removed only once the new folder is in place
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(dest, os.path.join(old, name))
        try:
            os.rename(tmp, dest)
        except OSError:
            if old is not None:  # put the old one back (where that fails too, the next call does)
                with contextlib.suppress(OSError):
                    os.replace(os.path.join(old, name), dest)
                    shutil.rmtree(old, ignore_errors=True)
            raise
        fsync_folder(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Decoded VAE output in [-1, 1], (N, 3, H, W) -> uint8 (N, H, W, 3).

    Rounds exactly as torchvision's ``save_image(normalize, value_range=(-1,1))``
    does (scale to [0, 255], + 0.5, clamp, truncate), the released samplers' way.
    """
    return to_uint8_tensor(x.detach().float().cpu()).numpy()


def to_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`to_uint8_images` on x's device: uint8 (N, H, W, 3) tensor. Every op is an exactly
    rounded fp32 op (the scalings are by 1/2 and 255), so the bytes do not depend on the device."""
    x = (x.detach().float().clamp(-1, 1) + 1) / 2
    x = (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3) with PIL's bicubic filter (antialiased when
    shrinking: its support widens with the scale), e.g. 512 px SD images written at an
    evaluation resolution. ``size`` None or equal to H = W: returned unchanged."""
    from PIL import Image

    if size is None or images.shape[1:3] == (size, size):
        return images
    out = [np.asarray(Image.fromarray(img, mode="RGB").resize((size, size), resample=Image.BICUBIC))
           for img in images]
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    # Fixed PNG settings: the same pixels always give the same bytes.
    Image.fromarray(img, mode="RGB").save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def class_done(out: str, name: str) -> bool:
    """Whether ``out/<name>/`` is a finished class (it holds the done mark)."""
    return os.path.isfile(os.path.join(out, name, DONE_MARK))


def done_record(out: str, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """Class ``name``'s done mark in ``out`` as write_class wrote it: (record, None), or (None, what is wrong
    with it: "cannot be read (<error>)", no mark there included, or "is not the record a run writes")."""
    try:
        with open(os.path.join(out, name, DONE_MARK), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSON's, and bytes that are not UTF-8
        return None, f"cannot be read ({type(e).__name__})"
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not isinstance(files, (dict, type(None))):
        return None, "is not the record a run writes"
    return info, None


class OutputWriter:
    """Owns ``OUT/``: which classes are finished, and writing one atomically."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        os.makedirs(self.out, exist_ok=True)

    def class_dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    def is_done(self, name: str) -> bool:
        return class_done(self.out, name)

    def done_classes(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.is_done(n)]

    def write_class(self, name: str, images: np.ndarray, latents: torch.Tensor | None,
                    info: dict[str, Any], data_stamps: str | None = None) -> None:
        """Write ``OUT/<name>/<i>.png`` (+ ``OUT/latents/<name>.safetensors``) atomically.

        images: uint8 (N, H, W, 3); latents: (N, C, h, w) final latents or None. ``data_stamps``: the
        digest of the class's image files' sizes and times (latents.stamps_digest), kept in the done mark
        (not in the manifest) for a resume to compare.
        The latents file is renamed into place first and the class folder last, so a
        finished class always has its latents; a run killed in between leaves a latents
        file of an unfinished class, which the rerun rewrites when it redoes the class.
        """
        from safetensors.torch import save as st_save

        final = self.class_dir(name)
        tmp = os.path.join(self.out, f".{name}.tmp-{os.getpid()}")
        if self.is_done(name):  # finished meanwhile by another process: two runs' processes share this OUT
            raise DataError(f"class {name} was finished by another process while this one sampled it ({final}): "
                            "two runs write into this --out (e.g. --shard runs with different N); rerun when "
                            "they have stopped to finish the rest")
        if os.path.lexists(final):  # is_done said no: not a class folder this tool finished, so not ours to delete
            raise DataError(f"{final} exists but is not a finished class of a run (no {DONE_MARK}); move it away "
                            "or use a new --out")
        if os.path.lexists(tmp):  # a killed attempt of this process's (or a file / link by its temp name)
            _remove_entry(tmp)
        os.makedirs(tmp)
        try:
            record = dict(info, files={})   # the done mark also lists what was written, which a resume checks
            if data_stamps is not None:
                record[DATA_STAMPS] = data_stamps
            for i, img in enumerate(images):
                data = encode_png(img)
                record["files"][f"{i}.png"] = hashlib.sha256(data).hexdigest()
                with open(os.path.join(tmp, f"{i}.png"), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # the folder is renamed into place only over files that are on disk
            if latents is not None:
                blob = st_save({"latents": latents.detach().float().cpu().contiguous()},
                               metadata={"class": name})
                record["latents_sha256"] = hashlib.sha256(blob).hexdigest()
                atomic_write_bytes(os.path.join(self.out, LATENTS_DIR, f"{name}.safetensors"), blob)
            with open(os.path.join(tmp, DONE_MARK), "w", encoding="utf-8") as f:
                json.dump(record, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_folder(self.out)
        except BaseException as e:  # e.g. a full disk: no half-written class left to fill it further
            shutil.rmtree(tmp, ignore_errors=True)
            # named by the class folder asked for, not by the temp's (a failed write() names no file at all)
            ours = isinstance(e, OSError) and (e.filename is None or str(e.filename).startswith(tmp))
            if ours and e.errno is not None:
                raise type(e)(e.errno, e.strerror, final) from None
            raise

    def read_class_info(self, name: str) -> dict[str, Any]:
        """A finished class's stats, as its done mark keeps them (without its files' digests); DataError naming
        the mark where it cannot be read."""
        info, why = done_record(self.out, name)
        if why:
            raise DataError(f"{os.path.join(self.class_dir(name), DONE_MARK)} {why}; delete {self.class_dir(name)} "
                            "and rerun to distill it again")
        return {k: v for k, v in info.items() if k not in ("files", "latents_sha256", DATA_STAMPS)}

    def damaged(self, name: str) -> str | None:
        """What is wrong with finished class ``name`` (None: nothing): its done mark unreadable, or an image or
        its latents file missing, changed (sha256) or added since the run wrote them. A class finished before
        the done mark listed its files (no ``files``) is not compared."""
        folder = self.class_dir(name)
        info, why = done_record(self.out, name)
        if why:
            return f"its {DONE_MARK} {why}"
        files = info.get("files")
        if files is None:
            return None

        def differs(rel: str, digest: str) -> str | None:
            try:
                if sha256_file(os.path.join(self.out, rel)) == digest:
                    return None
            except OSError as e:  # a folder in its place, no permission
                return f"{rel} cannot be read ({e.strerror or type(e).__name__})"
            return f"{rel} is not the file the run wrote (its sha256 differs)"

        present = {f for f in os.listdir(folder) if not f.startswith(".")}
        for fname in sorted(files, key=lambda f: (len(f), f)):   # 0.png, 1.png, ..., 10.png
            if fname not in present:
                return f"{name}/{fname} is missing"
            why = differs(os.path.join(name, fname), files[fname])
            if why:
                return why
        added = sorted(f for f in present - set(files) if os.path.splitext(f)[1].lower() in IMAGE_EXTS)
        if added:
            return f"{name}/{added[0]} is not one of the run's images"
        if info.get("latents_sha256") is not None:
            lat = os.path.join(LATENTS_DIR, f"{name}.safetensors")
            if not os.path.lexists(os.path.join(self.out, lat)):
                return f"{lat} is missing"
            return differs(lat, info["latents_sha256"])
        return None

    def check_finished(self, names: Iterable[str]) -> None:
        """DataError naming the first damaged class of the finished ones among ``names`` (in their order)
        and the way out; the classes are read on a few threads (hashlib releases the GIL)."""
        done = [n for n in names if self.is_done(n)]
        if not done:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(8, len(done))) as pool:
            for name, why in zip(done, pool.map(self.damaged, done)):
                if why is not None:
                    raise DataError(f"--out {self.out}: finished class {name} is damaged: {why}; delete "
                                    f"{self.class_dir(name)} to sample it again (the other classes resume)")

    def sweep_temps(self, classes: Iterable[str] | None = None, files: Iterable[str] = ()) -> list[str]:
        """Remove what killed runs left in ``OUT``: unfinished class folders ``.<class>.tmp-<pid>/`` and
        the temp files of atomic writes (``OUT``, ``OUT/latents``, and ``OUT/modes``' untouched for
        :data:`STALE_TEMP_S`: the ``modes`` command takes no lock). Only safe while no
        other run writes here: call it holding the :class:`RunLock` and :data:`MANIFEST_LOCK` (which
        ``eval`` / ``metrics`` hold while they add to the manifest), before this run's other ranks start
        writing. In ``OUT`` itself, temps of files a distill does not write (``eval`` / ``metrics``
        reports, their partial files and checkpoints: those commands take no run lock) go only once
        untouched for :data:`STALE_TEMP_S`. ``classes``: only those classes' leftovers (their folders and
        latents), and of ``OUT``'s own files only those named in ``files`` (an independent shard, whose
        lock covers just these). Returns the removed paths."""
        mine = None if classes is None else set(classes)
        removed = []
        now = time.time()
        for folder in (self.out, *(os.path.join(self.out, d) for d in RESERVED_DIRS)):
            if not os.path.isdir(folder):
                continue
            # the `modes` command writes OUT/modes without the lock: a fresh temp there may be its write in flight
            lockless = folder == os.path.join(self.out, MODES_DIR)
            for entry in os.listdir(folder):
                path = os.path.join(folder, entry)
                class_tmp = folder == self.out and entry.startswith(".") and ".tmp-" in entry and os.path.isdir(path)
                if not (entry.startswith(TMP_PREFIX) or class_tmp):
                    continue
                if mine is not None and not _temp_is_ours(entry, class_tmp, folder == self.out, mine, files):
                    continue
                if (lockless or (folder == self.out and not class_tmp and not _temp_is_ours(
                        entry, False, True, set(), (MANIFEST, CONTACT_SHEET)))) \
                        and now - os.lstat(path).st_mtime < STALE_TEMP_S:
                    continue
                _remove_entry(path, ignore_errors=True)
                removed.append(path)
        return removed

    def write_manifest(self, manifest: dict[str, Any]) -> str:
        path = os.path.join(self.out, MANIFEST)
        atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return path


def _temp_is_ours(entry: str, class_tmp: bool, top: bool, classes: set, files: Iterable[str]) -> bool:
    """Whether a leftover belongs to ``classes`` (``.<class>.tmp-<pid>/``; ``latents/`` or ``modes/``
    ``.tmp-<class>.safetensors-*``) or, in ``OUT`` itself, to one of ``files`` (``.tmp-<file>-*``)."""
    if class_tmp:
        return entry[1:entry.rindex(".tmp-")] in classes
    target = entry[len(TMP_PREFIX):]
    if top:
        return any(target.startswith(f"{f}-") for f in files)
    return target.rsplit(".safetensors-", 1)[0] in classes


def lock_is_held(path: str, *, exclusive_only: bool = False) -> bool:
    """Whether some process holds a ``flock`` on ``path`` (False where it does not exist or cannot be locked).

    ``exclusive_only``: whether a writer holds it exclusively (a whole distill run, a finetune), probed with a
    shared lock: readers that check at the same moment (torchrun's ranks loading one model, an eval and a
    metrics run) do not take each other for a writer, as exclusive probes did; a check that cannot tell says
    nothing (a shared read-only folder on NFS)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:  # read-write where it can: NFS emulates flock with byte-range locks, whose exclusive kind needs it
        fd = os.open(path, os.O_RDWR)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if exclusive_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError as e:  # e.g. EBADF: NFS will not lock a file this process may only read
        (log.debug if exclusive_only else log.warning)(
            "cannot tell whether %s is held (%s): nothing checks that its holders are not writing here", path,
            e.strerror or e)
        return False
    finally:
        os.close(fd)


class RunLock:
    """An exclusive ``flock`` on ``OUT/.lock``, held by one process (rank 0) while a run writes into OUT.

    A second run on the same ``--out`` stops with a one-line error naming the holder, instead of both
    writing the same classes and deleting each other's temp folders. The kernel drops the lock when its
    holder dies (even by SIGKILL), so a lock is never stale and a rerun never has to clear one. Where the
    file system cannot lock (e.g. Lustre mounted without ``flock``), the run warns and goes on unlocked.

    Independent shards (``--shard K/N``) hold ``OUT/.lock`` shared (``shared=True``: shards of one run
    together, never beside a whole run) and their own ``OUT/.lock-shard-K-of-N`` exclusively (``name``,
    ``what``: how a refusal names the other holder's run); ``wait=True`` blocks until the lock is free
    (the manifest's, held for a moment by whichever shard writes it).
    """

    def __init__(self, out: str, *, name: str = LOCK_NAME, shared: bool = False, wait: bool = False,
                 what: str = "another run", flag: str = "--out", target: str | None = None):
        self.path = os.path.join(os.path.abspath(out), name)
        self.shared, self.wait, self.what = shared, wait, what
        self.flag, self.target = flag, target   # how a refusal names what is locked (default: --out OUT)
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            log.warning("cannot lock %s on this platform: nothing stops two runs sharing this --out", self.path)
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            how = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if self.wait else fcntl.LOCK_NB)
            for attempt in range(4):  # (another process's lock_is_held probe holds it for an instant)
                try:
                    fcntl.flock(fd, how)
                    break
                except BlockingIOError:
                    if attempt == 3:
                        raise
                    time.sleep(0.05)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DataError(f"{self.flag} {self.target or os.path.dirname(self.path)} is being written by "
                            f"{self.what} ({holder}); wait for it to finish or use another {self.flag}") from None
        except OSError as e:
            os.close(fd)
            log.warning("cannot lock %s (%s): nothing stops two runs sharing this --out", self.path,
                        e.strerror or e)
            return self
        # who holds it, for the refusal of the next comer (shards sharing OUT/.lock all write the same words)
        text = SHARDS_HOLD if self.shared else (f"pid {os.getpid()} on {socket.gethostname()} since "
                                                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{text}\n".encode(), 0)
        except OSError as e:  # a full disk: write() names no file; the lock is not kept by a run that stops here
            os.close(fd)
            raise type(e)(e.errno, e.strerror, self.path) from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
