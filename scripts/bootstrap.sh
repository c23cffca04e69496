#!/usr/bin/env bash
# Idempotent set-up of everything ambient-lab needs, on Debian or Ubuntu.
# Used by the Makefile (`make lab`, `make test`), by .ci/run and by the Vagrantfile alike.
#
#   scripts/bootstrap.sh            system packages + .venv with the package
#   scripts/bootstrap.sh --test     the same, plus test extras and the tools tests call (vagrant, ruby)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
with_test=0
[ "${1:-}" = "--test" ] && with_test=1

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo make ...): the lab builds network namespaces and iptables rules"

# 1. Debian/Ubuntu packages. iptables brings iptables-legacy and the xtables extensions that
#    python-iptables loads; tshark decodes HBONE captures.
packages=(make iptables iproute2 tcpdump tshark curl procps ca-certificates gcc libc6-dev)
[ $with_test = 1 ] && packages+=(ruby vagrant tmux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Python >= 3.12 (mitmproxy 12 needs it). Ubuntu 24.04 has python3.12; elsewhere pyenv may.
find_python() {
  for c in python3.13 python3.12; do
    if p=$(command -v "$c" 2>/dev/null) && "$p" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in 3.12 3.13; do
      if pfx=$(pyenv prefix "$v" 2>/dev/null) && [ -x "$pfx/bin/python3" ]; then echo "$pfx/bin/python3"; return 0; fi
    done
  fi
  if p=$(command -v python3) && "$p" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
    echo "$p"; return 0
  fi
  if [ -d /usr/lib/python3 ] && apt-cache show python3.12-venv >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends python3.12 python3.12-venv python3.12-dev >/dev/null
    command -v python3.12 && return 0
  fi
  return 1
}
py=$(find_python) || die "Python >= 3.12 not found: install python3.12 (Ubuntu 24.04: apt-get install python3.12-venv) or pyenv install 3.12"
# Debian and Ubuntu ship venv's ensurepip separately (python3-venv / python3.12-venv).
if ! "$py" -c 'import ensurepip' 2>/dev/null; then
  v=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  say "installing python$v-venv"
  apt-get install -y -qq --no-install-recommends "python$v-venv" python3-venv >/dev/null
fi

# 3. The venv, re-installed only when pyproject.toml changed.
stamp=.venv/.stamp-$( (cat pyproject.toml; echo $with_test) | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  if [ ! -x .venv/bin/pip ]; then
    say "creating .venv with $("$py" --version)"
    rm -rf .venv/bin .venv/lib .venv/include .venv/pyvenv.cfg
    "$py" -m venv .venv || { rm -rf .venv/bin .venv/lib; die "could not create the venv"; }
  fi
  extras=""
  [ $with_test = 1 ] && extras="[test]"
  say "installing ambient-lab$extras into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".$extras"
  rm -f .venv/.stamp-*
  touch "$stamp"
  # a test venv also satisfies a plain one
  [ $with_test = 1 ] && touch ".venv/.stamp-$( (cat pyproject.toml; echo 0) | sha1sum | cut -c1-12)"
fi

# 4. The command on PATH, for `sudo ambient-lab ...` from any directory.
ln -sf "$here/.venv/bin/ambient-lab" /usr/local/bin/ambient-lab
say "ready: $(.venv/bin/python --version), ambient-lab at /usr/local/bin/ambient-lab"
