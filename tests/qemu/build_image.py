"""Build the kernel and initramfs of the two-node QEMU guest (tests/qemu/README.md).

    python tests/qemu/build_image.py [DEST]     # default DEST: $LUKERN_QEMU_IMAGE

Downloads two Debian packages with ``apt-get download`` (the distribution's kernel,
linux-image-amd64's current version, and busybox-static), unpacks them with ``dpkg-deb``
and writes ``DEST/vmlinuz`` and ``DEST/initrd.img``: busybox, the 9p/virtio modules and
``init`` (:data:`INIT`). Nothing is installed on the host and nothing here is committed.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: the modules the guest loads to mount the host's root over virtio-9p (deps resolved)
MODULES = ("virtio_pci", "9pnet_virtio", "9p")

#: the guest's /init: dump what lukern.topology reads from sysfs between markers, then,
#: when the kernel command line names a repository, mount the host's root read-only
#: over 9p and run tests/qemu/guest_check.py in it (chroot) with the host's Python
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo LUKERN-SYSFS-BEGIN
for f in /sys/devices/system/node/online /sys/devices/system/node/possible \
         /sys/devices/system/node/has_cpu /sys/devices/system/node/has_memory \
         /sys/devices/system/node/node*/cpulist /sys/devices/system/node/node*/meminfo \
         /sys/devices/system/node/node*/distance \
         /sys/devices/system/cpu/online /sys/devices/system/cpu/offline \
         /sys/devices/system/cpu/possible /sys/devices/system/cpu/present \
         /sys/devices/system/cpu/cpu*/cache/index*/level /sys/devices/system/cpu/cpu*/cache/index*/type \
         /sys/devices/system/cpu/cpu*/cache/index*/size \
         /sys/devices/system/cpu/cpu*/cache/index*/shared_cpu_list \
         /sys/devices/system/cpu/cpu*/cache/index*/coherency_line_size; do
  if [ -f "$f" ]; then echo "LUKERN-FILE $f"; cat "$f"; fi
done
echo LUKERN-SYSFS-END
repo=$(sed -n 's/.*lukern_repo=\([^ ]*\).*/\1/p' /proc/cmdline)
py=$(sed -n 's/.*lukern_python=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$repo" ]; then
  for m in $(cat /modules/order); do insmod /modules/$m; done
  if mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /mnt; then
    mount -t proc proc /mnt/proc; mount -t sysfs sysfs /mnt/sys
    mount -t devtmpfs devtmpfs /mnt/dev; mount -t tmpfs tmpfs /mnt/tmp
    chroot /mnt /bin/sh -c "cd $repo && HOME=/tmp XDG_CACHE_HOME=/tmp/cache NUMBA_CACHE_DIR=/tmp/numba \
      LUKERN_CACHE_DIR=/tmp/lukern PYTHONPATH=$repo $py tests/qemu/guest_check.py"
  else
    echo "LUKERN-ERROR 9p mount failed"
  fi
fi
echo LUKERN-GUEST-DONE
poweroff -f
"""


def _download(names, where: Path):
    subprocess.run(["apt-get", "download", *names], cwd=where, check=True, stdout=subprocess.DEVNULL)
    for deb in where.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(where / "root")], check=True)


def _kernel_package() -> str:
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], check=True, capture_output=True,
                         text=True).stdout
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)", out)
    if not m:
        raise SystemExit(f"cannot find the kernel package behind linux-image-amd64:\n{out}")
    return m.group(1)


def _modinfo_depends(data: bytes) -> list[str]:
    """The ``depends=`` field of a module's .modinfo (depmod's modules.dep is made at
    install time, and nothing is installed here)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def _modules(moddir: Path) -> list[tuple[str, bytes]]:
    """(name, .ko bytes) of :data:`MODULES` and what they depend on, dependencies first."""
    paths = {}
    for p in moddir.rglob("*.ko*"):
        paths[p.name.split(".ko")[0].replace("-", "_")] = p
    order: list[str] = []
    data: dict[str, bytes] = {}

    def visit(name):
        name = name.replace("-", "_")
        if name in data:
            return
        data[name] = _read_module(paths[name])
        for d in _modinfo_depends(data[name]):
            visit(d)
        order.append(name)

    for name in MODULES:
        visit(name)
    return [(n, data[n]) for n in order]


def _cpio(entries) -> bytes:
    """A newc archive of (path, mode, data or None for a directory)."""
    out = bytearray()
    for ino, (path, mode, data) in enumerate(list(entries) + [("TRAILER!!!", 0, b"")], start=1):
        name = path.encode() + b"\0"
        data = data or b""
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # apt-get download drops privileges to _apt
        _download([_kernel_package(), "busybox-static"], tmp)
        root = tmp / "root"
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))[-1]
        moddir = sorted((root / "lib" / "modules").iterdir())[-1]
        mods = _modules(moddir)
        entries = [(d, 0o40755, None) for d in ("bin", "modules", "proc", "sys", "dev", "mnt", "tmp")]
        entries.append(("bin/busybox", 0o100755, (root / "bin" / "busybox").read_bytes()))
        entries.append(("init", 0o100755, INIT.encode()))
        for name, data in mods:
            entries.append((f"modules/{name}.ko", 0o100644, data))
        entries.append(("modules/order", 0o100644, "".join(f"{n}.ko\n" for n, _ in mods).encode()))
        shutil.copyfile(vmlinuz, dest / "vmlinuz")
        (dest / "initrd.img").write_bytes(gzip.compress(_cpio(entries)))
    return dest


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LUKERN_QEMU_IMAGE")
    if not target:
        raise SystemExit("usage: python tests/qemu/build_image.py DEST (or set LUKERN_QEMU_IMAGE)")
    print(build(Path(target)))
