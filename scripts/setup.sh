#!/usr/bin/env bash
# One-command install for a fresh Debian/Ubuntu machine (or any Linux/macOS with Python >= 3.10):
#   scripts/setup.sh
# - system packages (when apt-get exists and we are root or have non-interactive sudo):
#   mosquitto (real broker; tests start their own instance, the service is not started here),
#   dataset-fashion-mnist (offline Fashion-MNIST), python3-venv,
#   prometheus (the dashboard test scrapes a live run), podman + runc + debootstrap (container image
#   test), catatonit (the pause process of `podman kube play` pods: the k8s/ rehearsal)
# - .venv with this project installed editable with all extras: pip install -e ".[dev]"
# Re-running is fast: each step is skipped when already done.
# Environment: PYTHON=/path/to/python3.x to choose the interpreter; SKIP_APT=1 to skip apt.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -t 2 ]]; then B=$'\033[1m' Y=$'\033[33m' R=$'\033[31m' N=$'\033[0m'; else B="" Y="" R="" N=""; fi
say()  { printf '%s==>%s %s\n' "$B" "$N" "$*"; }
warn() { printf '%swarning:%s %s\n' "$Y" "$N" "$*" >&2; }
die()  { printf '%serror:%s %s\n' "$R" "$N" "$*" >&2; exit 1; }
free_mb() { df -Pm . | awk 'NR == 2 {print $4}'; }

NEED_INSTALL_MB="${NEED_INSTALL_MB:-7000}"
APT_PACKAGES=(mosquitto dataset-fashion-mnist python3-venv prometheus podman runc catatonit debootstrap)

# ---------------------------------------------------------------------------------- system
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if [[ "${SKIP_APT:-0}" != 1 ]] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    if ((${#missing[@]} == 0)); then
        say "system packages present: ${APT_PACKAGES[*]}"
    else
        SUDO=""
        if [[ "$(id -u)" -ne 0 ]]; then
            if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
                SUDO="sudo -n"
            else
                SUDO="none"
            fi
        fi
        if [[ "$SUDO" == none ]]; then
            warn "missing system packages: ${missing[*]} (not root and no passwordless sudo)"
            warn "install them with: sudo apt-get install ${missing[*]}"
        else
            say "installing system packages: ${missing[*]}"
            export DEBIAN_FRONTEND=noninteractive
            $SUDO apt-get update -qq || warn "apt-get update failed; trying the install anyway"
            if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
                # one unavailable package (e.g. dataset-fashion-mnist outside Debian) must not
                # block the others
                for p in "${missing[@]}"; do
                    $SUDO apt-get install -y -qq --no-install-recommends "$p" \
                        || warn "could not install '$p' (not available here?); continuing without it"
                done
            fi
        fi
    fi
else
    warn "apt-get not used: install mosquitto yourself for the Mosquitto tests (the embedded broker needs nothing)"
fi
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] \
    || warn "mosquitto not found: Mosquitto tests will be skipped (sudo apt-get install mosquitto)"

# ---------------------------------------------------------------------------------- python
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
else
    PY=""
    for cand in python3 python3.13 python3.12 python3.11 python3.10; do
        if command -v "$cand" >/dev/null 2>&1 \
           && "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            PY="$cand"; break
        fi
    done
    [[ -n "$PY" ]] || die "Python >= 3.10 is required ($(python3 --version 2>&1 || echo 'python3 not found')); install it or set PYTHON=/path/to/python3.x"
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "Python >= 3.10 is required, $PY is $("$PY" --version 2>&1)"

if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    say "using existing .venv ($(.venv/bin/python --version 2>&1))"
else
    [[ -e .venv ]] && { warn "removing broken or too old .venv"; rm -rf .venv; }
    say "creating .venv with $("$PY" --version 2>&1)"
    "$PY" -m venv .venv || die "could not create a venv: on Debian/Ubuntu run 'sudo apt-get install python3-venv'"
    .venv/bin/python -m pip install --upgrade pip
fi

# Reinstall only when pyproject.toml changed since the last successful install.
STAMP=.venv/.posbfl-installed
want="$(cksum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
   && .venv/bin/python -c 'import broker, edge_agent, orchestrator, paho.mqtt, amqtt, pytest' 2>/dev/null; then
    say "project already installed in .venv (pyproject.toml unchanged)"
else
    # torch with its CUDA libraries (PyPI's default build) takes about 5.6 GB in the venv;
    # a full disk mid-install leaves a broken venv and an obscure error
    free="$(free_mb)"
    if [[ -n "$free" ]] && ((free < NEED_INSTALL_MB)); then
        die "only ${free} MB free here; installing torch and the other dependencies needs about ${NEED_INSTALL_MB} MB (set NEED_INSTALL_MB to override)"
    fi
    say 'pip install -e ".[dev]"'
    .venv/bin/python -m pip install -e ".[dev]"
    echo "$want" > "$STAMP"
fi

# the suite writes about 1.1 GB (runs, chains, model blobs), the container test about 3 GB
free="$(free_mb)"
if [[ -n "$free" ]] && ((free < 6000)); then
    warn "only ${free} MB free: the test suite needs about 1.1 GB and 'scripts/test.sh -m slow' about 3 GB more"
fi

cat <<'EOF'

Setup done. Next steps:
  . .venv/bin/activate            # bfl and bfl-agent are on PATH
  scripts/test.sh                  # run the test suite (extra pytest args allowed)
  python -m broker.embedded --port 1883        # a broker without Mosquitto, or
  python -m broker.mosquitto render --devices d00..d19 --out /tmp/bfl-broker   # Mosquitto config
EOF
