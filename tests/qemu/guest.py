"""Boot the two-node QEMU guest and read what it reports (tests/qemu/README.md).

``LUKERN_QEMU_IMAGE`` names a folder with ``vmlinuz`` and ``initrd.img`` from
``build_image.py``. The guest has two NUMA nodes (``-numa node`` x2, one CPU and
``mem_mib`` MiB each), emulated by TCG (slow) unless ``LUKERN_QEMU_KVM=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def image() -> Path | None:
    """The image folder when QEMU and a built image are both present, else None."""
    folder = os.environ.get("LUKERN_QEMU_IMAGE")
    if not folder or shutil.which("qemu-system-x86_64") is None:
        return None
    folder = Path(folder)
    return folder if (folder / "vmlinuz").is_file() and (folder / "initrd.img").is_file() else None


def use_kvm() -> bool:
    """KVM only when asked (``LUKERN_QEMU_KVM=1``) and /dev/kvm opens: on the nested
    reference VM the guest kernel hung before its first message under KVM."""
    if os.environ.get("LUKERN_QEMU_KVM") != "1":
        return False
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


def boot(folder: Path, *, run_python: bool, mem_mib: int = 1024, timeout: float = 900) -> str:
    """Boot, wait for the guest to power off, return its console output."""
    append = "console=ttyS0 panic=-1 quiet"
    if run_python:
        append += f" lukern_repo={REPO} lukern_python={sys.executable}"
    cmd = ["qemu-system-x86_64", "-M", "q35", "-m", f"{2 * mem_mib}M", "-smp", "2",
           "-object", f"memory-backend-ram,id=m0,size={mem_mib}M",
           "-object", f"memory-backend-ram,id=m1,size={mem_mib}M",
           "-numa", "node,nodeid=0,cpus=0,memdev=m0", "-numa", "node,nodeid=1,cpus=1,memdev=m1",
           "-kernel", str(folder / "vmlinuz"), "-initrd", str(folder / "initrd.img"), "-append", append,
           "-nographic", "-no-reboot", "-monitor", "none"]
    cmd += ["-enable-kvm", "-cpu", "host,-arch-capabilities"] if use_kvm() else ["-cpu", "max"]
    if run_python:
        cmd += ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on"]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.stdout.decode(errors="replace").replace("\r\n", "\n")


def sysfs_tree(console: str, root: Path) -> list[str]:
    """Write the sysfs files the guest dumped under ``root`` (standing for /sys); return
    their paths."""
    body = console.split("LUKERN-SYSFS-BEGIN\n", 1)[1].split("LUKERN-SYSFS-END", 1)[0]
    paths = []
    for chunk in body.split("LUKERN-FILE ")[1:]:
        path, _, text = chunk.partition("\n")
        rel = Path(path.strip()).relative_to("/sys")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        paths.append(str(rel))
    return paths


def result(console: str) -> dict | None:
    for line in console.splitlines():
        if line.startswith("LUKERN-RESULT "):
            return json.loads(line[len("LUKERN-RESULT "):])
    return None


if __name__ == "__main__":
    folder = image()
    if folder is None:
        raise SystemExit("set LUKERN_QEMU_IMAGE to a folder built by tests/qemu/build_image.py (and install qemu)")
    print(boot(folder, run_python="--python" in sys.argv))
