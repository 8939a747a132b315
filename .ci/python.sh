#!/usr/bin/env bash
# Run the project's Python 3.12 environment, creating it first if needed:
#   bash .ci/python.sh [python args...]
# Finds a Python >= 3.12 (python3.12/python3.13 on PATH, then pyenv's versions), makes
# .venv in the repository root and installs the package with its test and example extras
# (PyTorch, compressed-tensors, the MiniLM model). The venv is
# rebuilt when pyproject.toml changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.pyproject.sha"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"

find_python() {
  local c v
  for c in python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1; then
      v="$("$c" -c 'import sys; print(sys.version_info >= (3, 12))' 2>/dev/null || true)"
      [ "$v" = "True" ] && { command -v "$c"; return 0; }
    fi
  done
  local proot
  proot="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for c in "$proot"/versions/3.12.*/bin/python3 "$proot"/versions/3.13.*/bin/python3; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  py="$(find_python)" || { echo "error: need Python >= 3.12 (none on PATH or under pyenv)" >&2; exit 1; }
  echo "setting up $venv with $py" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  log="$venv/install.log"
  if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
         "$venv/bin/python" -m pip install -q -e "$root[test,example]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: installing the package failed (log above)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
cd "$root"
exec "$venv/bin/python" "$@"
