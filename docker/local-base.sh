#!/usr/bin/env bash
# A base image for docker/Dockerfile (PYTHON_IMAGE) made without any container registry: Debian bookworm
# installed by debootstrap from a Debian mirror, with what the Dockerfile uses of the official
# python:3.11-slim image (`python` on PATH, venv, the Python headers, CA certificates), plus the C and C++
# compilers torch.compile needs at run time, so that a build on it reaches no Debian mirror either.
#
#   docker/local-base.sh [TAG]                  as root, with debootstrap and a Docker engine (DOCKER_HOST)
#   DEBIAN_MIRROR=http://mirror.example/debian docker/local-base.sh
#
# Its Python is Debian's 3.11 (the lock is for CPython 3.11). To carry it to an air-gapped host:
#   docker save igcv2-base/python:3.11-bookworm | gzip > base.tar.gz     and there: docker load -i base.tar.gz
set -euo pipefail
tag=${1:-igcv2-base/python:3.11-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/igcv2-base.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
chmod 755 "$rootfs"  # it becomes the image's / (mktemp made it 700: no other user could reach anything)
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-dev,python-is-python3,ca-certificates,gcc,g++,libc6-dev \
    bookworm "$rootfs" "$mirror"
# As in the official images: no package lists or downloaded packages left in the image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
# An imported image has no environment: PATH must be set for the Dockerfile's ENV PATH=/opt/venv/bin:$PATH.
tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap bookworm from $mirror, by docker/local-base.sh" \
    - "$tag"
# What the Dockerfile's build runs, as a user other than root (the image runs as one).
docker run --rm --network none --user 65534:65534 "$tag" \
    sh -c 'python -m venv /tmp/venv && python -c "import ssl, sysconfig" && g++ --version >/dev/null'
echo "$tag: $(docker run --rm --network none "$tag" python --version)"
