#!/usr/bin/env bash
# A Debian bookworm base with Python 3.11 and venv, as a local image named $1, for
# building the CPU image where no registry can be reached: debootstrap (needs root)
# into a temporary folder, then import it. About 40 s; does nothing if $1 exists.
set -euo pipefail
name="${1:?usage: docker/local-base.sh IMAGE_NAME [MIRROR]}"
# The mirror this machine's apt uses (what can be reached here), else Debian's own.
apt_mirror() {
    grep -hoE '^(URIs:\s*|deb\s+(\[[^]]*\]\s+)?)https?://[^ ]+' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -oE 'https?://[^ ]+' | grep -v security | head -n 1
}
mirror="${2:-$(apt_mirror || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"
engine="${ENGINE:-podman}"
if "$engine" image inspect "$name" >/dev/null 2>&1; then exit 0; fi
command -v debootstrap >/dev/null || {
    echo "docker/local-base.sh: debootstrap is missing (apt-get install debootstrap)" >&2
    exit 2
}
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >/dev/null
tar -C "$rootfs" -c . | "$engine" import - "$name" >/dev/null
echo "built base image $name"
