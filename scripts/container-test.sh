#!/usr/bin/env bash
# Builds the container image (Dockerfile) for the CPU and proves that it works,
# on a machine with no image registry and no container runtime:
#
#   1. a minimal Debian bookworm root with python3 is made with debootstrap
#      (cached in ~/.cache/qwen-image-server/container/ or $QIS_CONTAINER_CACHE,
#      reused when present) and `podman import`ed;
#   2. a wheelhouse for that base's python (torch's CPU wheel, every dependency,
#      setuptools) is filled with `pip download` outside the build (cached there too,
#      reused when complete) and copied into deploy/wheelhouse/, so the build itself
#      needs no network;
#   3. `podman build --isolation chroot --storage-driver vfs` builds the Dockerfile's
#      `test` stage: the image's default command serves two tiny models put in
#      /models, and one generation and one edit must succeed, or the build fails
#      (scripts/container_smoke.py);
#   4. the image itself (the runtime stage, which the Dockerfile's last stage is:
#      the test stage is not in it) is tagged and its size reported; this project's
#      untagged images of earlier builds are removed (vfs keeps a copy per step).
#
# Where podman or debootstrap are missing and cannot be installed (root and
# apt-get are needed), it prints "skipped: ..." and exits 0. Otherwise any failure
# fails the script.
#
#   scripts/container-test.sh                 # IMAGE=localhost/qwen-image-server:cpu
#   IMAGE=qis:dev scripts/container-test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

IMAGE="${IMAGE:-localhost/qwen-image-server:cpu}"
# Per machine, outside the checkout, so that a fresh clone (CI's) reuses the Debian root and the wheels.
CACHE="${QIS_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qwen-image-server/container}"
SUITE=bookworm
BASE_PYTHON=3.11                  # bookworm's python3 and glibc 2.36: the wheelhouse is made for them
GLIBC_MINOR=36
BASE_PACKAGES=python3,python3-venv,ca-certificates
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEELHOUSE=deploy/wheelhouse
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
# torch's CPU build (2.13.0+cpu) is on PyTorch's own index, not on PyPI; blank: only pip's configured sources.
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
EXTRAS="${EXTRAS:-s3}"
PYTHON="${PYTHON:-python3}"
PODMAN=(podman --storage-driver vfs)
START=$SECONDS

say() { printf 'container-test: [%4ss] %s\n' "$((SECONDS - START))" "$*"; }
skip() {
	echo "container-test: skipped: $*"
	exit 0
}

# --- 1. tools -------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
	[[ $(id -u) -eq 0 ]] || skip "${missing[*]} not installed, and installing needs root"
	command -v apt-get >/dev/null || skip "${missing[*]} not installed, and there is no apt-get to install them"
	say "installing ${missing[*]} with apt-get"
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
		skip "apt-get could not install ${missing[*]}"
fi
[[ $(id -u) -eq 0 ]] || skip "debootstrap and podman's chroot builds need root"

# --- 2. the base image ----------------------------------------------------------
mkdir -p "$CACHE"
base_tar="$CACHE/$SUITE-python.tar"
if [[ ! -f $base_tar ]]; then
	say "making a $SUITE root with $BASE_PACKAGES (debootstrap, once)"
	root="$CACHE/rootfs.tmp"
	rm -rf "$root"
	nice -n 10 debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
		{
			tail -20 "$CACHE/debootstrap.log"
			exit 1
		}
	rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
	tar --numeric-owner -C "$root" -cf "$base_tar.tmp" .
	mv "$base_tar.tmp" "$base_tar"
	rm -rf "$root"
fi
# The tag names the tarball's content, so a remade root is imported anew.
base_image="localhost/qis-base:$SUITE-$(sha256sum "$base_tar" | cut -c1-12)"
if ! "${PODMAN[@]}" image exists "$base_image"; then
	say "importing $base_tar as $base_image"
	"${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' "$base_tar" "$base_image" >/dev/null
fi

# --- 3. the wheelhouse ----------------------------------------------------------
requirements="$CACHE/requirements.txt"
"$PYTHON" - "$EXTRAS" "$TORCH_VERSION" >"$requirements" <<'EOF'
import sys, tomllib

extras, torch = sys.argv[1], sys.argv[2]
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [d for d in project["dependencies"] if not d.startswith("torch")]
for extra in filter(None, extras.split(",")):
    deps += project["optional-dependencies"][extra]
print("\n".join([f"torch=={torch}+cpu", "setuptools>=69", *deps]))
EOF
complete=".complete-$(cat "$requirements" | sha256sum | cut -c1-12)-py$BASE_PYTHON"
wheels="$CACHE/wheels-py$BASE_PYTHON"
if [[ ! -f $wheels/$complete ]]; then
	say "downloading wheels for python $BASE_PYTHON into $wheels"
	mkdir -p "$wheels"
	# pip does not widen a --platform to the older manylinux tags it implies: list them.
	platforms=()
	for minor in $(seq "$GLIBC_MINOR" -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
	for tag in manylinux2014 manylinux2010 manylinux1 linux; do platforms+=(--platform "${tag}_x86_64"); done
	# PyTorch's index where it answers (a machine without it, pip's find-links holding the wheel, is asked once,
	# not by pip for every requirement with retries).
	torch_index=()
	if [[ -n $TORCH_INDEX_URL ]] && "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)' "$TORCH_INDEX_URL" 2>/dev/null; then
		torch_index=(--extra-index-url "$TORCH_INDEX_URL")
	else
		say "${TORCH_INDEX_URL:-no TORCH_INDEX_URL}: not reachable; torch==${TORCH_VERSION}+cpu must come from pip's own sources (find-links)"
	fi
	"$PYTHON" -m pip download --quiet --dest "$wheels" --requirement "$requirements" "${torch_index[@]}" \
		--only-binary=:all: --python-version "$BASE_PYTHON" --implementation cp "${platforms[@]}"
	touch "$wheels/$complete"
fi
# The build mounts the wheelhouse from its context: the cached wheels go there (hard links where possible).
if [[ ! -f $WHEELHOUSE/$complete ]]; then
	say "putting the wheels into $WHEELHOUSE"
	cp -l "$wheels"/*.whl "$WHEELHOUSE"/ 2>/dev/null || cp "$wheels"/*.whl "$WHEELHOUSE"/
	touch "$WHEELHOUSE/$complete"
fi

# --- 4. build, test, measure -----------------------------------------------------
build=(nice -n 10 "${PODMAN[@]}" build --isolation chroot --format docker --pull=never --layers
	--build-arg BASE="$base_image" --build-arg OFFLINE=1 --build-arg EXTRAS="$EXTRAS"
	--build-arg TORCH_VERSION="$TORCH_VERSION" --build-arg EXTRA_APT_PACKAGES=)
say "building the test stage (the server is started and called inside the build)"
log="$CACHE/build.log"
"${build[@]}" --target test --tag "$IMAGE-test" . 2>&1 | tee "$log"
# One build gives both images: podman names each stage's image where the next stage
# starts FROM it. The image is the runtime stage (what the Dockerfile's last stage
# is); the dependency stage is tagged so that pruning keeps it and a change of the
# sources reinstalls only the package.
stage_image() { sed -n "s/^\[[0-9]*\/[0-9]*\] STEP 1\/[0-9]*: FROM \([0-9a-f]\{64\}\) AS $1\$/\1/p" "$log" | tail -1; }
runtime_id=$(stage_image test)
deps_id=$(stage_image build)
if [[ -n $runtime_id && -n $deps_id ]]; then
	"${PODMAN[@]}" tag "$runtime_id" "$IMAGE"
	"${PODMAN[@]}" tag "$deps_id" "$IMAGE-deps"
else
	say "building $IMAGE (the Dockerfile's last stage, from the cached layers)"
	"${build[@]}" --tag "$IMAGE" .
fi
entrypoint=$("${PODMAN[@]}" image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")
[[ $entrypoint == '["qwen-image-server"]' ]] || {
	echo "container-test: $IMAGE has the entrypoint $entrypoint, not the image's" >&2
	exit 1
}
# vfs storage keeps a full copy of the tree per step: drop this project's untagged
# images (earlier builds' steps), nobody else's.
"${PODMAN[@]}" image prune --force --filter label=org.opencontainers.image.title=qwen-image-server >/dev/null
"${PODMAN[@]}" images --filter reference="$IMAGE" --format 'container-test: {{.Repository}}:{{.Tag}} {{.Size}}'
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
say "passed: $IMAGE is $((size / 1000000)) MB"
