"""Class sharding across processes started by torchrun, or independent ``--shard K/N`` processes.

Classes are dealt to ranks round-robin in the run's class order (class j to
rank j mod N). Nothing random depends on the rank: every seed derives from
(run seed, class, sample), so the output has the same bytes for any N. Ranks
only meet at barriers (a gloo process group, which works with or without
GPUs); a rank that dies leaves finished classes on disk and a rerun deals
the unfinished ones over all its ranks (``pipeline.prepare(done=)``).

``--shard K/N`` (a Slurm job array, jobs on any nodes at any times): process K
takes classes j with j mod N == K of the whole run, never meets the others and
holds only a shared lock on OUT plus its own shard's lock; the manifest is
brought up to date by each shard as it finishes (``Shard.independent``).
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import importlib
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError, DataError


TIMEOUT_ENV = "MANIFOLDGD_DIST_TIMEOUT"


def barrier_timeout() -> float:
    """Seconds a rank waits at a barrier for the others: ``$MANIFOLDGD_DIST_TIMEOUT``, default one day.

    Ranks meet only at the start and the end, so the early ones wait out the slowest rank's classes
    (gloo's default, 30 minutes, is shorter than one rank's share of a large run). A rank that dies
    does not leave the others waiting: torchrun stops them all.
    """
    raw = os.environ.get(TIMEOUT_ENV, "86400")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT_S:  # (inf or 1e300 would overflow datetime.timedelta)
        raise ConfigError(f"${TIMEOUT_ENV}={raw!r}: expected a positive number of seconds, at most {MAX_TIMEOUT_S:g}")
    return value


MAX_TIMEOUT_S = 365 * 86400.0


def _env_int(name: str, default: str | None = None) -> int:
    raw = os.environ.get(name, default)
    if raw is None:
        raise ConfigError(f"${name} is not set, but WORLD_SIZE {os.environ.get('WORLD_SIZE')} says this process is one "
                          "of several: start it with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and "
                          "MASTER_PORT (or unset WORLD_SIZE)")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"${name}={raw!r}: expected an integer (torchrun's environment)") from None


@dataclass
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _group: bool = False
    independent: bool = False   # --shard K/N: no process group, a static share of the whole run's classes

    @classmethod
    def from_config(cls, spec: str | None) -> "Shard":
        """``--shard K/N`` (independent) when given, else torchrun's environment (:meth:`from_env`)."""
        if spec is None:
            return cls.from_env()
        from .config import parse_shard

        rank, world = parse_shard(spec)
        if _env_int("WORLD_SIZE", "1") > 1:
            raise ConfigError(f"--shard {spec} under torchrun (WORLD_SIZE {os.environ['WORLD_SIZE']}): use one or "
                              "the other")
        return cls(rank=rank, world=world, independent=True)

    @classmethod
    def from_env(cls) -> "Shard":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; join a gloo group when WORLD_SIZE > 1."""
        world = _env_int("WORLD_SIZE", "1")
        if world <= 1:
            return cls()
        rank = _env_int("RANK")
        if not 0 <= rank < world:
            raise ConfigError(f"$RANK={rank} is outside [0, WORLD_SIZE {world}): torchrun's environment is inconsistent")
        local = _env_int("LOCAL_RANK", str(rank))
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ConfigError(f"${name} is not set, but WORLD_SIZE {world} says this process is one of several: "
                                  "start it with torchrun (or unset WORLD_SIZE)")
        timeout = barrier_timeout()
        import torch.distributed as dist

        joined = False
        if not dist.is_initialized():
            # torch.distributed.nn's functions take `group=group.WORLD` as a default, evaluated at import: imported
            # after the group is made (diffusers imports it, through torch.distributed.fsdp), they held the group
            # past destroy_process_group, its gloo threads ran on into the interpreter's exit, and now and then a
            # finished rank died there by SIGABRT ("terminate called without an active exception"). Imported
            # first, the defaults are None.
            importlib.import_module("torch.distributed.nn")

            dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
            joined = True
        return cls(rank=rank, world=world, local_rank=local, _group=joined)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def mine(self, items: list) -> list:
        return [it for j, it in enumerate(items) if self.owns(j)]

    def device(self, name: str) -> str:
        """Each rank on its own GPU when the device is auto / cuda and there are several ranks (an
        independent shard is one process of its own: the scheduler gives it its GPU)."""
        if self.world > 1 and not self.independent and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        if self.world <= 1 or self.independent or not str(name).startswith("cuda:"):
            return name  # (one process does not read LOCAL_WORLD_SIZE: a stray or empty one is not its concern)
        local_world = _env_int("LOCAL_WORLD_SIZE", str(self.world))
        if local_world > 1:
            raise ConfigError(f"--device {name} under torchrun would put all {local_world} ranks of this node on "
                              "one GPU; give --device cuda (each rank takes cuda:LOCAL_RANK)")
        return name

    def agree(self, value: str, what: str) -> None:
        """Check that every rank computed rank 0's ``value`` (a digest of what each rank read for itself, e.g. the
        class listing): a rank that differs stops with a one-line error naming it, its host and ``what``."""
        if self.world <= 1 or self.independent:
            return
        import socket

        import torch.distributed as dist

        got: list = [None] * self.world
        dist.all_gather_object(got, (value, socket.gethostname()))
        counts = collections.Counter(v for v, _ in got)
        # the odd ones out are those that differ from the majority (from rank 0 on a tie): rank 0 may be the one
        ref = got[0][0] if counts[got[0][0]] == max(counts.values()) else counts.most_common(1)[0][0]
        bad = [f"rank {r} on {host}" for r, (v, host) in enumerate(got) if v != ref]
        if bad:  # every rank stops with the same line (rank 0 too: it would go on encoding alone)
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            whom = "rank 0 sees" if ref == got[0][0] else "the other ranks see"
            raise DataError(f"{', '.join(bad[:3])}{more} does not see what {whom} ({what}): every rank must see "
                            "the same --data and --out (a node whose mount is missing or stale?)")

    def barrier_or_raise(self, err: BaseException | None) -> None:
        """A barrier that also shares whether a rank met a user error (``err``, a ConfigError / DataError it
        caught, or None): a rank that met one raises it, and the others the first, by rank, with its one line
        (rank 0 refusing a locked OUT left the others to die at the next barrier with gloo's traceback)."""
        if self.world <= 1 or self.independent:
            if err is not None:
                raise err
            return
        import torch.distributed as dist

        got: list = [None] * self.world
        dist.all_gather_object(got, None if err is None else (type(err).__name__, str(err)))
        first = next((g for g in got if g is not None), None)
        if err is not None:
            raise err
        if first is not None:
            raise (ConfigError if first[0] == "ConfigError" else DataError)(first[1])

    @contextlib.contextmanager
    def sharing_errors(self):
        """A block whose user errors (ConfigError / DataError) every rank meets: the block, then
        :meth:`barrier_or_raise` with what it raised (a check of this rank's classes alone, whose failure
        otherwise left the other ranks to die at their next barrier)."""
        err = None
        try:
            yield
        except (ConfigError, DataError) as exc:
            err = exc
        self.barrier_or_raise(err)

    def barrier(self) -> None:
        if self.world > 1 and not self.independent:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False
