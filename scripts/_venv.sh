# Sourced by the scripts: create or reuse ./.venv and install the locked dependencies, then the
# project itself (editable, --no-deps). `ensure_venv ""` installs requirements.txt (the runtime),
# `ensure_venv test` requirements-test.txt (runtime + test + dev tools, the same runtime pins).
# Reinstalls, into an emptied venv, only when pyproject.toml or the lock changed since the last
# install (the stamp holds their checksums), so nothing left over from an older lock survives.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GATEWAY_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"

# The checksums a venv installed from LOCK is stamped with.
_venv_stamp_text() {
  local lock="$1"
  printf '%s %s\n' "$(basename "$lock")" "$(cat "$ROOT/pyproject.toml" "$lock" | sha256sum | cut -d' ' -f1)"
}

ensure_venv() {
  local extras="$1" lock
  case "$extras" in
    "") lock="$ROOT/requirements.txt" ;;
    test) lock="$ROOT/requirements-test.txt" ;;
    *) echo "ensure_venv: no lock for extras '$extras'" >&2; return 1 ;;
  esac
  local stamp="$VENV/.installed-lock" want have=""
  want="$(_venv_stamp_text "$lock")"
  [ -f "$stamp" ] && have="$(cat "$stamp")"
  [ "$have" = "$want" ] && return 0
  # The test lock holds every runtime pin at the same version (scripts/lock), so a venv
  # installed from it serves the runtime scripts too.
  if [ -z "$extras" ] && [ "$have" = "$(_venv_stamp_text "$ROOT/requirements-test.txt")" ]; then
    return 0
  fi
  echo "installing $(basename "$lock") into $VENV" >&2
  "$PYTHON_BIN" -m venv --clear "$VENV"
  local log="$VENV/pip-install.log"
  if ! {
      "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip \
      && "$VENV/bin/python" -m pip install --disable-pip-version-check --require-hashes -r "$lock" \
      && "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
    } >"$log" 2>&1; then
    cat "$log" >&2
    echo "pip install failed (log: $log)" >&2
    return 1
  fi
  printf '%s\n' "$want" >"$stamp"
}
