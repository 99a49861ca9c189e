#!/usr/bin/env bash
# Installs the SMT solver `meshgate policy prove` needs: cvc5 >= 1.3.1.
#
# Debian's cvc5 package is too old (1.0.x) and cvc5 publishes no binary on the registries
# this project uses, so this takes PyPI's `cvc5` wheel (libcvc5 with Python bindings) into a
# virtualenv and installs scripts/cvc5-smt.py as its `bin/cvc5`: a command that reads
# SMT-LIB on stdin like the cvc5 binary does.
#
#   scripts/install-cvc5.sh [DIR]
#
# DIR defaults to ${XDG_DATA_HOME:-$HOME/.local/share}/meshgate/cvc5, where `meshgate policy
# prove` looks after `$CVC5` and `cvc5` on the PATH. Idempotent: a working install is kept.
# Prints the solver's path on stdout (and nothing else), progress on stderr.
set -euo pipefail

CVC5_WHEEL_VERSION=1.4.2
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-${XDG_DATA_HOME:-$HOME/.local/share}/meshgate/cvc5}
solver=$dir/bin/cvc5

works() {
  local out
  out=$(printf '(set-logic ALL)\n(declare-const x Int)\n(assert (> x 1))\n(check-sat)\n' |
    "$solver" --lang smt 2>/dev/null) && [ "$out" = sat ] &&
    cmp -s "$here/cvc5-smt.py" "$dir/lib/cvc5-smt.py"
}

mkdir -p "$(dirname "$dir")"
# Tests may run this from several processes at once: one installs, the others wait.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$dir.lock"
  flock 9
fi

if [ -x "$solver" ] && works; then
  echo "cvc5 already installed: $solver" >&2
  echo "$solver"
  exit 0
fi

python=""
for candidate in python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 &&
    "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
    python=$(command -v "$candidate")
    break
  fi
done
if [ -z "$python" ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing python3 and python3-venv (Debian packages)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    python=$(command -v python3)
  else
    echo "install-cvc5: needs Python 3.9 or newer with the venv module (Debian: apt-get install python3 python3-venv)" >&2
    exit 1
  fi
fi

echo "installing cvc5 $CVC5_WHEEL_VERSION (PyPI wheel) into $dir" >&2
mkdir -p "$dir"
# A half-made virtualenv (no pip, say, after an interrupted run) is made again.
if ! "$dir/venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$dir/venv"
  if ! "$python" -m venv "$dir/venv" >&2; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing python3-venv (Debian package)" >&2
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$dir/venv"
      "$python" -m venv "$dir/venv" >&2
    else
      echo "install-cvc5: \`$python -m venv\` failed (Debian: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
"$dir/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "cvc5==$CVC5_WHEEL_VERSION" >&2

mkdir -p "$dir/bin" "$dir/lib"
cp "$here/cvc5-smt.py" "$dir/lib/cvc5-smt.py.new"
mv "$dir/lib/cvc5-smt.py.new" "$dir/lib/cvc5-smt.py"
cat >"$dir/bin/cvc5.new" <<EOF
#!/bin/sh
# cvc5 for SMT-LIB sessions on stdin (see $dir/lib/cvc5-smt.py); made by install-cvc5.sh.
exec "$dir/venv/bin/python" -u "$dir/lib/cvc5-smt.py" "\$@"
EOF
chmod 0755 "$dir/bin/cvc5.new"
mv "$dir/bin/cvc5.new" "$solver"

if ! works; then
  echo "install-cvc5: $solver does not answer a test query" >&2
  exit 1
fi
echo "installed: $("$solver" --version)" >&2
echo "$solver"
