#!/usr/bin/env bash
# Build the posbfl-testbed container images (see the Dockerfile at the repository root):
#   NAME:VERSION            full image: bfl-agent (train, validate, mine; CPU torch) and bfl
#   NAME:VERSION-validator  validate + mine only (ONNX Runtime), no torch
#   NAME:VERSION-broker     Mosquitto from Debian, non-root (mount a config; see the Dockerfile)
# NAME defaults to posbfl-testbed, VERSION to pyproject.toml's version.
#
# With internet and a registry (Docker or podman), the defaults are all you need:
#   scripts/container/build.sh                     # base python:3.11-slim-bookworm, torch from
#                                                  # the PyTorch CPU index
# On a machine with no registry (like this testbed's CI machine):
#   scripts/container/build.sh --local
#
# Options:
#   --local            this testbed machine: --base local, --ca-bundle /etc/ssl/certs/ca-certificates.crt,
#                      --wheels /opt/wheels (each only if it exists; torch then comes from a
#                      torch-*+cpu wheel there, its dependencies from the pip index),
#                      --isolation chroot, CONTAINERS_CONF=containers.conf beside this script
#   --base IMAGE       base image with Python 3.11 (default python:3.11-slim-bookworm);
#                      'local' = localhost/bfl-base:bookworm, made with debootstrap (root) if missing
#   --rebuild-base     remake the local base even if it exists
#   --mirror URL       Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   --ca-bundle FILE   mount FILE into the build (/run/bfl-ca.crt) and set PIP_CERT to it: for a
#                      TLS-intercepting proxy. Nothing of it stays in the image.
#   --wheels DIR       mount DIR into the build (/run/bfl-wheels) as PIP_FIND_LINKS (local wheels,
#                      e.g. torch)
#   --pip-index URL    PIP_INDEX_URL for the build (default: pip's, PyPI)
#   --torch-index URL  index for torch (default https://download.pytorch.org/whl/cpu)
#   --torch-version V  torch release (default 2.13.0; with --local: the +cpu wheel's, e.g. 2.13.0+cpu)
#   --targets LIST     comma-separated subset of full,validator,broker (default all three)
#   --name NAME        image name (default posbfl-testbed)
#   --version V        tag (default: pyproject.toml's version)
#   --engine E         podman or docker (default: podman if installed, else docker)
#   --isolation I      podman build --isolation (default: podman's; chroot with --local)
#   --no-cache         do not reuse cached layers
#   --prune            afterwards remove dangling images (earlier builds' leftovers: ~2.5 GB per
#                      source change) from the engine's storage; the build cache of the expensive
#                      stages survives as NAME:VERSION-cache-{wheels,torch,full-venv,validator-venv}
# --ca-bundle and --wheels need podman (docker build has no -v). Environment: CONTAINERS_CONF
# (podman) is respected if set; BUILD_ARGS="..." adds raw arguments to every build command.
# Prints the time of each step and the image sizes.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

LOCAL=0 BASE="" REBUILD_BASE=0 MIRROR="http://deb.debian.org/debian" CA="" WHEELS="" PIP_INDEX=""
TORCH_INDEX="https://download.pytorch.org/whl/cpu" TORCH_INDEX_SET=0 TORCH_VERSION="" TARGETS="full,validator,broker"
NAME="posbfl-testbed" VERSION="" ENGINE="" ISOLATION="" NO_CACHE=0 PRUNE=0
LOCAL_BASE="localhost/bfl-base:bookworm"
while (($#)); do
    case "$1" in
        --local) LOCAL=1 ;;
        --base) BASE="$2"; shift ;;
        --rebuild-base) REBUILD_BASE=1 ;;
        --mirror) MIRROR="$2"; shift ;;
        --ca-bundle) CA="$2"; shift ;;
        --wheels) WHEELS="$2"; shift ;;
        --pip-index) PIP_INDEX="$2"; shift ;;
        --torch-index) TORCH_INDEX="$2"; TORCH_INDEX_SET=1; shift ;;
        --torch-version) TORCH_VERSION="$2"; shift ;;
        --targets) TARGETS="$2"; shift ;;
        --name) NAME="$2"; shift ;;
        --version) VERSION="$2"; shift ;;
        --engine) ENGINE="$2"; shift ;;
        --isolation) ISOLATION="$2"; shift ;;
        --no-cache) NO_CACHE=1 ;;
        --prune) PRUNE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

if ((LOCAL)); then
    [[ -n "$BASE" ]] || BASE=local
    [[ -n "$CA" || ! -f /etc/ssl/certs/ca-certificates.crt ]] || CA=/etc/ssl/certs/ca-certificates.crt
    [[ -n "$WHEELS" || ! -d /opt/wheels ]] || WHEELS=/opt/wheels
    [[ -n "$ISOLATION" ]] || ISOLATION=chroot
    if [[ -n "$WHEELS" ]] && ((TORCH_INDEX_SET == 0)); then
        # torch from the CPU wheel in the folder (pinned with its +cpu label: plain torch from
        # PyPI is the multi-GB CUDA build), its dependencies from the pip index
        whl="$(find "$WHEELS" -maxdepth 1 -name 'torch-*+cpu-*.whl' | sort | tail -n 1)"
        if [[ -n "$whl" ]]; then
            TORCH_INDEX="${PIP_INDEX:-https://pypi.org/simple}"
            [[ -n "$TORCH_VERSION" ]] || TORCH_VERSION="$(basename "$whl" | cut -d- -f2)"
        fi
    fi
    [[ -n "${CONTAINERS_CONF:-}" ]] || export CONTAINERS_CONF="$HERE/containers.conf"
fi
[[ -n "$BASE" ]] || BASE="python:3.11-slim-bookworm"
[[ -n "$TORCH_VERSION" ]] || TORCH_VERSION="2.13.0"
if [[ -z "$ENGINE" ]]; then
    if command -v podman >/dev/null 2>&1; then ENGINE=podman
    elif command -v docker >/dev/null 2>&1; then ENGINE=docker
    else die "neither podman nor docker is installed"; fi
fi
command -v "$ENGINE" >/dev/null 2>&1 || die "$ENGINE is not installed"
if [[ "$ENGINE" != podman && ( -n "$CA" || -n "$WHEELS" ) ]]; then
    die "--ca-bundle/--wheels mount files into the build, which needs podman (docker build has no -v)"
fi
if [[ -z "$VERSION" ]]; then
    VERSION="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -n 1)"
    [[ -n "$VERSION" ]] || die "cannot read the version from pyproject.toml; pass --version"
fi

T_START=$SECONDS
timed() {  # timed LABEL CMD...: run CMD, print how long it took
    local label="$1" t0=$SECONDS
    shift
    "$@"
    say "$label: $((SECONDS - t0))s"
}

# ------------------------------------------------------------------------- local base image
make_local_base() {
    [[ "$(id -u)" == 0 ]] || die "making the local base image needs root (debootstrap); or pass --base IMAGE"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install debootstrap)"
    local dir
    dir="$(mktemp -d /var/tmp/bfl-base.XXXXXX)"
    # shellcheck disable=SC2064
    trap "umount -R '$dir/proc' '$dir/sys' '$dir/dev/pts' 2>/dev/null || true; rm -rf --one-file-system '$dir'" EXIT
    say "debootstrap bookworm ($MIRROR) into $dir"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$dir" "$MIRROR" >"$dir.log" 2>&1 \
        || { tail -n 30 "$dir.log" >&2; die "debootstrap failed (full log: $dir.log)"; }
    rm -f "$dir.log"
    local sec="${MIRROR%/debian}/debian-security"
    cat >"$dir/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $sec bookworm-security main
EOF
    # like the official slim images: no apt lists, no cached .debs, no docs or man pages
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/var/log/*.log "$dir"/tmp/* "$dir"/root/.cache
    say "importing it as $LOCAL_BASE"
    tar -C "$dir" --numeric-owner -cf - . | "$ENGINE" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase bookworm + python3 python3-venv ca-certificates" \
        - "$LOCAL_BASE" >/dev/null
    rm -rf --one-file-system "$dir"
    trap - EXIT
}

if [[ "$BASE" == local ]]; then
    BASE="$LOCAL_BASE"
    if ((REBUILD_BASE)) || ! "$ENGINE" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        timed "base image $LOCAL_BASE (debootstrap + import)" make_local_base
    else
        say "base image $LOCAL_BASE exists (--rebuild-base to remake it)"
    fi
fi

# ------------------------------------------------------------------------------- the images
build=("$ENGINE" build -f "$ROOT/Dockerfile" --build-arg "BASE_IMAGE=$BASE"
       --build-arg "TORCH_INDEX_URL=$TORCH_INDEX" --build-arg "TORCH_VERSION=$TORCH_VERSION")
if [[ "$ENGINE" == podman ]]; then
    build+=(--format docker)  # keeps HEALTHCHECK/SHELL-style metadata; same as docker's images
    [[ -z "$ISOLATION" ]] || build+=("--isolation=$ISOLATION")
fi
((NO_CACHE == 0)) || build+=(--no-cache)
if [[ -n "$CA" ]]; then
    [[ -f "$CA" ]] || die "--ca-bundle $CA: no such file"
    build+=(-v "$(realpath "$CA"):/run/bfl-ca.crt:ro" --build-arg PIP_CERT=/run/bfl-ca.crt)
fi
if [[ -n "$WHEELS" ]]; then
    [[ -d "$WHEELS" ]] || die "--wheels $WHEELS: no such folder"
    build+=(-v "$(realpath "$WHEELS"):/run/bfl-wheels:ro" --build-arg PIP_FIND_LINKS=/run/bfl-wheels)
fi
[[ -z "$PIP_INDEX" ]] || build+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX")
# shellcheck disable=SC2206
[[ -z "${BUILD_ARGS:-}" ]] || build+=(${BUILD_ARGS})

say "engine $ENGINE${CONTAINERS_CONF:+ (CONTAINERS_CONF=$CONTAINERS_CONF)}, base $BASE, torch==$TORCH_VERSION from $TORCH_INDEX${WHEELS:+ + $WHEELS}"
built=()
IFS=, read -r -a targets <<<"$TARGETS"
stages=()
for t in "${targets[@]}"; do
    case "$t" in
        full) stages+=(wheels torch full-venv full) ;;
        validator) stages+=(wheels validator-venv validator) ;;
        broker) stages+=(broker) ;;
        *) die "--targets: unknown target '$t' (full, validator, broker)" ;;
    esac
done
declare -A done_stage=()
for t in "${stages[@]}"; do
    [[ -z "${done_stage[$t]:-}" ]] || continue
    done_stage[$t]=1
    case "$t" in
        full) tag="$NAME:$VERSION" ;;
        validator|broker) tag="$NAME:$VERSION-$t" ;;
        # the intermediate stages (dependency wheels, torch, the venvs) are tagged too, so that
        # --prune (or any `podman image prune`) keeps them as build cache
        *) tag="$NAME:$VERSION-cache-$t" ;;
    esac
    timed "target $t -> $tag" "${build[@]}" --target "$t" -t "$tag" "$ROOT"
    [[ "$tag" == *-cache-* ]] || built+=("$tag")
done
if ((PRUNE)); then
    # Each build whose sources changed leaves the previous images untagged (~2.5 GB for the full
    # image and its venv stage); this removes all dangling images of this engine's storage.
    timed "prune dangling images" "$ENGINE" image prune -f >/dev/null
fi

say "total: $((SECONDS - T_START))s"
for tag in "${built[@]}"; do
    size="$("$ENGINE" image inspect --format '{{.Size}}' "$tag")"
    printf '%-40s %6d MB\n' "$tag" "$((size / 1000000))"
done
