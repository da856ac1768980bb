"""Per-container uid ranges: each pool container maps its ids to a range of the host's
that no other container holds, so what the kernel counts per uid (pipe buffers, queued
signals, message queue bytes, ...) is never shared between containers.

The sandbox image is stored once, owned by the first range. A container of another range
sees it through an idmapped mount of the image (the first range shifted onto its own),
which its overlay takes as its lower layer: no copy, one page cache.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
# The mount API's calls have one number on every architecture Linux has added them to.
_OPEN_TREE, _MOVE_MOUNT, _MOUNT_SETATTR = 428, 429, 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
USERNS_TIMEOUT_S = 10.0


class RangeError(RuntimeError):
    """No range is free, or an idmapped view of the image cannot be made."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(number: int, *args: object) -> int:
    result = int(_libc.syscall(ctypes.c_long(number), *args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class Ranges:
    """`count` ranges of `size` ids from `base`: which container holds which. A range is
    taken when a container is made and given back only once it is destroyed."""

    def __init__(self, base: int, size: int, count: int) -> None:
        self.base, self.size, self.count = base, size, count
        self.held: dict[str, int] = {}

    def take(self, name: str) -> int:
        """The root uid (and gid) on the host of container `name`'s range."""
        if name in self.held:
            return self.root(self.held[name])
        free = sorted(set(range(self.count)) - set(self.held.values()))
        if not free:
            raise RangeError(f"all {self.count} uid ranges are held (idmap_ranges): a "
                             "container can start once another is destroyed")
        self.held[name] = free[0]
        return self.root(free[0])

    def give_back(self, name: str) -> None:
        self.held.pop(name, None)

    def root(self, index: int) -> int:
        return self.base + index * self.size



def subid_entry(line: str) -> tuple[str, int, int] | None:
    """An /etc/subuid (or subgid) line as (user, first id, count), or None."""
    parts = line.strip().split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def root_covers(entry: tuple[str, int, int] | None, base: int, span: int) -> bool:
    """Whether a `subid_entry` gives root every id of `base`..`base + span - 1`."""
    return entry is not None and entry[0] in ("root", "0") and \
        entry[1] <= base and base + span <= entry[1] + entry[2]


class Views:
    """Idmapped views of the image, one user namespace per range that needs one; the
    namespaces live as long as their descriptors, which `close` releases."""

    def __init__(self, image_base: int, size: int) -> None:
        self.image_base, self.size = image_base, size
        self.userns: dict[int, int] = {}

    def _userns(self, root: int) -> int:
        if root not in self.userns:
            self.userns[root] = mapping_namespace(self.image_base, root, self.size)
        return self.userns[root]

    def mount(self, image_rootfs: Path, root: int, target: Path) -> None:
        """Mount at `target` the image as a container whose range starts at `root` sees it
        (ids from the image's base shifted onto `root`)."""
        userns = self._userns(root)
        try:
            tree = _syscall(_OPEN_TREE, _AT_FDCWD, os.fsencode(image_rootfs),
                            _OPEN_TREE_CLONE | os.O_CLOEXEC)
        except OSError as exc:
            raise RangeError(f"cannot clone a view of {image_rootfs}: {exc}") from None
        try:
            attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns)
            _syscall(_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                     ctypes.sizeof(attr))
            _syscall(_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(target),
                     _MOVE_MOUNT_F_EMPTY_PATH)
        except OSError as exc:
            raise RangeError(f"cannot map {image_rootfs} onto uid {root} (idmapped mounts "
                             f"need Linux 5.19 or later and a filesystem that has them, "
                             f"such as ext4, xfs or btrfs): {exc}") from None
        finally:
            os.close(tree)

    def close(self) -> None:
        for fd in self.userns.values():
            os.close(fd)
        self.userns.clear()


def mapping_namespace(inner: int, outer: int, size: int) -> int:
    """A user namespace whose ids `inner`.. are the host's `outer`.. (`size` of them),
    held by the descriptor returned. Made by a `cat` that unshared it: once it echoes a
    byte it is inside, its maps are written, the namespace is opened, and it exits."""
    with subprocess.Popen(["/usr/bin/unshare", "--user", "--", "/usr/bin/cat"],  # not PATH's
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            holder.stdin.write(b"x")
            holder.stdin.flush()
            if holder.stdout.read(1) != b"x":
                raise RangeError("unshare --user did not start")
            for name in ("uid_map", "gid_map"):
                Path(f"/proc/{holder.pid}/{name}").write_text(f"{inner} {outer} {size}\n")
            return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RangeError(f"cannot make a user namespace for uid {outer}: {exc}") from None
        finally:
            holder.stdin.close()
            holder.wait(USERNS_TIMEOUT_S)
