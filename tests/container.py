"""Building and running the appliance image without a Docker engine: a Debian base image made
locally with debootstrap (no registry is reachable) and imported into podman, builds on vfs
storage with chroot isolation, containers run by runc with no network. docs/container.md shows
the same commands for people; tests/test_container.py drives them."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"

# The Debian release of python:3.11-slim-bookworm, whose python3 is the 3.11 the project targets.
DEBIAN_SUITE = "bookworm"
BASE_IMAGE = f"localhost/appliance-base:{DEBIAN_SUITE}"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
PUBLIC_MIRROR = "http://deb.debian.org/debian"
# Left out of the imported base, as slim images do: package caches and lists, documentation,
# translations. Patterns are tar's, on member names as `tar -C ROOTFS -c .` writes them.
BASE_EXCLUDES = (
    "./var/cache/apt/archives/*.deb",
    "./var/lib/apt/lists/*",
    "./usr/share/doc/*",
    "./usr/share/man/*",
    "./usr/share/info/*",
    "./usr/share/locale/*",
)

APPLIANCE_UID = 10001  # the image's `appliance` user (Dockerfile)
STORAGE_ENV = "APPLIANCE_CONTAINER_STORAGE"
DEFAULT_STORAGE = Path("/var/tmp/appliance-containers")
# Where the host keeps its CA bundle, and where Debian-based images keep theirs.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

TOOLS = ("podman", "runc", "debootstrap", "tar")


class ContainerToolError(RuntimeError):
    """A podman, debootstrap or tar command failed; the message holds its command and output."""


def missing_tools() -> list[str]:
    """The commands this module needs that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive this host's apt uses, for debootstrap: the first `deb` source whose URI
    names a Debian archive (not the security one) and that lists a plain release (no `-updates`
    or `-backports`). The public mirror when there is none, e.g. on an Ubuntu host."""
    for uri, suites in _apt_sources(apt_dir):
        is_debian = "debian" in uri and "security" not in uri
        if is_debian and any("-" not in suite and "/" not in suite for suite in suites):
            return uri
    return PUBLIC_MIRROR


def _apt_sources(apt_dir: Path) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled `deb` source, in apt's reading order."""
    sources: list[tuple[str, list[str]]] = []
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        for line in _text(path).splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            if words and words[0].startswith("["):  # [arch=amd64 signed-by=...] options
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if len(words) >= 2:
                sources.append((words[0], [words[1]]))
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in _deb822_stanzas(_text(path)):
            enabled = stanza.get("enabled", "yes").lower() != "no"
            if enabled and "deb" in stanza.get("types", "").split():
                suites = stanza.get("suites", "").split()
                sources.extend((uri, suites) for uri in stanza.get("uris", "").split())
    return sources


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return ""


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    """The paragraphs of a deb822 file as {lower-case field: value}; continuation lines (leading
    space) join their field, `#` lines are comments."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    field = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, field = {}, ""
        elif line[0].isspace() and field:
            current[field] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            field = key.strip().lower()
            current[field] = value.strip()
    return stanzas


def _ulimits() -> list[str]:
    """Explicit limits for runc. Without them podman asks for its rootful defaults (open files
    1048576, processes unlimited), and raising a limit above the caller's hard limit needs
    CAP_SYS_RESOURCE, which sandboxed CI runners do not have: runc fails with EPERM."""
    nofile = min(8192, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[1])
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def _unmount_below(path: Path) -> None:
    """Detach whatever is mounted inside `path` (debootstrap mounts /proc and /sys in its target
    and may leave them when it fails), so deleting the tree never reaches the host's."""
    prefix = str(path.resolve()) + "/"
    with Path("/proc/self/mounts").open(encoding="utf-8") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)


@dataclass(frozen=True)
class Podman:
    """podman with a storage of its own (vfs: no overlay mounts needed) under `root`, so the
    tests never touch, or depend on, the host's default container storage."""

    root: Path

    @classmethod
    def dedicated(cls) -> Podman:
        """The storage named by $APPLIANCE_CONTAINER_STORAGE, else /var/tmp/appliance-containers
        (kept between runs: the debootstrapped base image is made once)."""
        return cls(Path(os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE))

    def command(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            "vfs",
            # No systemd on CI runners: plain cgroupfs, and events in a file instead of journald.
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            *args,
        ]

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise ContainerToolError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}{result.stderr[-4000:]}"
            )
        return result

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def ensure_base_image(self, tag: str = BASE_IMAGE) -> bool:
        """Make the Debian base image with debootstrap and import it as `tag`, unless it exists.
        True when it was made now."""
        if self.image_exists(tag):
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix="debootstrap-") as work:
            rootfs = Path(work) / "rootfs"
            try:
                self._debootstrap(rootfs)
                self._import(rootfs, tag)
            finally:
                _unmount_below(Path(work))
        return True

    def _debootstrap(self, rootfs: Path) -> None:
        command = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            DEBIAN_SUITE,
            str(rootfs),
            debian_mirror(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            raise ContainerToolError(
                f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-4000:]}"
                f"{result.stderr[-4000:]}"
            )

    def _import(self, rootfs: Path, tag: str) -> None:
        excludes = [f"--exclude={pattern}" for pattern in BASE_EXCLUDES]
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", *excludes, "-c", "."],
            stdout=subprocess.PIPE,
        )
        assert tar.stdout is not None
        try:
            imported = subprocess.run(
                self.command("import", "--change", 'CMD ["/bin/bash"]', "-", tag),
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        finally:
            tar.stdout.close()
            tar_code = tar.wait(timeout=600)
        if tar_code != 0 or imported.returncode != 0:
            raise ContainerToolError(
                f"importing {rootfs} as {tag}: tar exited {tar_code}, podman import exited "
                f"{imported.returncode}:\n{imported.stderr[-4000:]}"
            )

    def build(self, tag: str, *, base: str, log_path: Path, timeout: float = 1200) -> float:
        """Build the repository's Dockerfile as `tag` on `base`; the seconds it took. The whole
        output goes to `log_path`; a failure raises with its end."""
        args = [
            "build",
            "--isolation",
            "chroot",
            # One layer per stage instead of one per instruction: vfs copies each layer whole.
            "--layers=false",
            # Docker format: the OCI image format has no HEALTHCHECK.
            "--format",
            "docker",
            "--pull=never",
            "--build-arg",
            f"BASE={base}",
            *_ulimits(),
            *self._host_trust(),
            "--tag",
            tag,
            "--file",
            str(DOCKERFILE),
            str(ROOT),
        ]
        started = time.monotonic()
        with log_path.open("w", encoding="utf-8") as log:
            result = subprocess.run(
                self.command(*args),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        seconds = time.monotonic() - started
        if result.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-6000:]
            raise ContainerToolError(f"podman build exited {result.returncode}:\n{tail}")
        return seconds

    @staticmethod
    def _host_trust() -> list[str]:
        """The host's CA bundle over the build's, read-only, for pip (PIP_CERT): CI runners reach
        PyPI through a TLS-intercepting egress proxy that only the host trusts. A mount over an
        existing file leaves nothing in the image; without a host bundle, nothing changes."""
        if not CA_BUNDLE.is_file():
            return []
        return [
            "--volume",
            f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
            "--build-arg",
            f"PIP_CERT={CA_BUNDLE}",
        ]

    def image_size(self, ref: str) -> int:
        """Bytes of the image's layers, uncompressed (what `podman images` shows)."""
        return int(self.run("image", "inspect", "--format", "{{.Size}}", ref).stdout)

    def image_inspect(self, ref: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.run("image", "inspect", ref).stdout)
        return data[0]

    def start(
        self,
        image: str,
        name: str,
        volumes: dict[Path, str],
        env: dict[str, str] | None = None,
        command: tuple[str, ...] = (),
    ) -> None:
        """Run `image` detached as `name`, with host paths mounted (host: `container path[:ro]`)
        and environment variables set; `command` replaces the image's CMD (its arguments to
        the `appliance` entrypoint)."""
        mounts = [arg for host, inner in volumes.items() for arg in ("--volume", f"{host}:{inner}")]
        variables = [arg for item in (env or {}).items() for arg in ("--env", "=".join(item))]
        self.run(
            "run",
            "--detach",
            "--name",
            name,
            "--runtime",
            "runc",
            "--network",
            "none",
            "--log-driver",
            "k8s-file",
            *_ulimits(),
            *mounts,
            *variables,
            image,
            *command,
        )

    def healthcheck(self, name: str) -> tuple[bool, str]:
        """Run the image's HEALTHCHECK once now: (healthy, podman's words)."""
        result = self.run("healthcheck", "run", name, check=False)
        return result.returncode == 0, (result.stdout + result.stderr).strip()

    def state(self, name: str) -> str:
        """`running`, `exited`, ... of a container."""
        return self.run("inspect", "--format", "{{.State.Status}}", name).stdout.strip()

    def exit_code(self, name: str) -> int:
        return int(self.run("inspect", "--format", "{{.State.ExitCode}}", name).stdout)

    def exec(
        self, name: str, *command: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        variables = [arg for item in (env or {}).items() for arg in ("--env", "=".join(item))]
        return self.run("exec", *variables, name, *command, check=False)

    def stop(self, name: str, grace_s: int) -> float:
        """`podman stop`: the image's STOPSIGNAL, SIGKILL after `grace_s`; the seconds it took."""
        started = time.monotonic()
        self.run("stop", "--time", str(grace_s), name, timeout=grace_s + 60)
        return time.monotonic() - started

    def logs(self, name: str) -> str:
        result = self.run("logs", name)
        return result.stdout + result.stderr

    def remove_container(self, name: str) -> None:
        self.run("rm", "--force", "--time", "0", name, check=False)

    def remove_image(self, ref: str) -> None:
        self.run("rmi", "--force", ref, check=False)
