#!/usr/bin/env bash
# Install bfl-agent as a systemd service on an edge device (Raspberry Pi OS / Debian / Ubuntu /
# JetPack; aarch64, armv7 without torch, or x86_64). Run it from a checkout of this repository:
#
#   sudo deploy/device/install.sh                    # worker + validator + miner (pulls CPU torch)
#   sudo deploy/device/install.sh --validator-only   # ONNX Runtime only: no torch
#   sudoedit /etc/bfl/bfl-agent.env                  # device id, broker, operator key
#   sudo systemctl enable --now bfl-agent && journalctl -u bfl-agent -f
#
# What it does: apt-get installs python3-venv (and dataset-fashion-mnist when available),
# creates the system user `bfl`, a venv in /opt/bfl/venv with the project, installs the unit
# /etc/systemd/system/bfl-agent.service and, if absent, /etc/bfl/bfl-agent.env.
#
# Options:
#   --validator-only     no torch: the device validates and mines (BFL_CAPS defaults accordingly)
#   --torch SPEC         the torch requirement for workers (default: "torch"; on a Jetson use
#                        NVIDIA's JetPack wheel, e.g. --torch /path/to/torch-*.whl)
#   --root DIR           install below DIR instead of / (packaging, tests); skips apt, the
#                        user and systemctl
#   --python EXE         the interpreter for the venv (default python3, >= 3.10)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
root=""
validator_only=0
torch_spec="torch"
python=python3

die() { echo "error: $*" >&2; exit 1; }
while (($#)); do
    case "$1" in
        --validator-only) validator_only=1 ;;
        --torch) torch_spec="${2:?--torch needs a requirement or wheel path}"; shift ;;
        --root) root="${2:?--root needs a directory}"; shift ;;
        --python) python="${2:?--python needs an interpreter}"; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
[[ -f "$repo/pyproject.toml" ]] || die "run this from a checkout of the repository ($repo has no pyproject.toml)"
if [[ -z "$root" && "$(id -u)" -ne 0 ]]; then
    die "run as root (sudo), or pass --root DIR to install into a folder"
fi

if [[ -z "$root" ]] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || echo "warning: apt-get update failed; trying the install anyway" >&2
    apt-get install -y -qq --no-install-recommends python3-venv ca-certificates
    apt-get install -y -qq --no-install-recommends dataset-fashion-mnist 2>/dev/null \
        || echo "note: dataset-fashion-mnist not available here; set BFL_DATA_DIR to the IDX files" >&2
fi
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "$python is older than Python 3.10"

venv="$root/opt/bfl/venv"
echo "==> venv $venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if ((validator_only)); then
    echo "==> installing the validator-only agent (no torch)"
    "$venv/bin/python" -m pip install --quiet "$repo[validator]"
else
    echo "==> installing torch ($torch_spec) and the agent"
    # torch alone, not the [worker] extra: torchvision is only needed to download MNIST
    "$venv/bin/python" -m pip install --quiet "$torch_spec"
    "$venv/bin/python" -m pip install --quiet "$repo[validator]"
fi
"$venv/bin/bfl-agent" --help >/dev/null

etc="$root/etc/bfl"
mkdir -p "$etc"
if [[ -e "$etc/bfl-agent.env" ]]; then
    echo "==> keeping $etc/bfl-agent.env"
else
    cp "$here/bfl-agent.env" "$etc/bfl-agent.env"
    if ((validator_only)); then
        sed -i 's/^#BFL_CAPS=validate,mine/BFL_CAPS=validate,mine/' "$etc/bfl-agent.env"
    fi
    chmod 0644 "$etc/bfl-agent.env"
    echo "==> wrote $etc/bfl-agent.env (edit BFL_DEVICE_ID, BFL_BROKER, BFL_OPERATOR_KEY)"
fi
unit_dir="$root/etc/systemd/system"
mkdir -p "$unit_dir"
cp "$here/bfl-agent.service" "$unit_dir/bfl-agent.service"
echo "==> installed $unit_dir/bfl-agent.service"

if [[ -z "$root" ]]; then
    id bfl >/dev/null 2>&1 || useradd --system --home-dir /var/lib/bfl --shell /usr/sbin/nologin bfl
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        echo "next: put the operator's public key in /etc/bfl/operator.pub, edit /etc/bfl/bfl-agent.env,"
        echo "      then: sudo systemctl enable --now bfl-agent && journalctl -u bfl-agent -f"
    else
        echo "note: systemd is not running here; start the agent with:"
        echo "      sudo -u bfl env \$(grep -v '^#' /etc/bfl/bfl-agent.env | xargs) /opt/bfl/venv/bin/bfl-agent run"
    fi
fi
