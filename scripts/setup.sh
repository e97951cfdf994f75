# Sourced by ./run: make this machine ready, idempotently, from nothing (fresh Debian, root).
# Installs the Debian packages with the real data, a Python with venv, then the project into .venv.
# Re-running is cheap: each step checks first and skips what is already done.

APT_DATA_PACKAGES=(dataset-fashion-mnist tuxpaint-stamps-default)
# The tests start a real single-node Slurm cluster from these (tests/launch/slurm_cluster.py).
APT_SLURM_PACKAGES=(slurmctld slurmd slurm-client munge)
VENV="${CLIPFORGE_VENV:-$PWD/.venv}"

_as_root() {
  if [ "$(id -u)" = 0 ]; then "$@";
  elif command -v sudo >/dev/null; then sudo "$@";
  else echo "setup: '$*' needs root (run as root or install sudo)" >&2; return 1; fi
}

_apt_install() {
  # Only touch apt when something is missing: `apt-get update` alone costs ~20 s.
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: apt-get install ${missing[*]}"
  _as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive _as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

_python_ok() {
  command -v python3 >/dev/null && python3 - <<'PY' 2>/dev/null
import sys, venv, ensurepip  # ensurepip is what Debian's python3 lacks without python3-venv
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
}

setup_machine() {
  _python_ok || _apt_install python3 python3-venv python3-dev ca-certificates
  _apt_install "${APT_DATA_PACKAGES[@]}"
  local stamp="$VENV/.clipforge-installed" want
  want=$(sha256sum setup.py | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  echo "setup: pip install -e '.[dev]' into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
}

setup_slurm() {
  # Tests only. The packages' postinst scripts would start system munge/slurm daemons: a
  # policy-rc.d that refuses (exit 101) keeps them stopped; the tests run their own.
  local missing=()
  for p in "${APT_SLURM_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || { echo "setup: not root, skipping Slurm (its tests will skip)" >&2; return 0; }
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
  local rc=0
  _apt_install "${APT_SLURM_PACKAGES[@]}" || rc=$?
  if [ "$created" = 1 ]; then rm -f "$policy"; fi
  return $rc
}
