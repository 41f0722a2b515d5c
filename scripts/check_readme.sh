#!/usr/bin/env bash
# README's code blocks must be complete and true: extract them, build the ```c block against the
# package installed from BUILD_DIR (through pkg-config) and run it, run the ```python block with
# Debian's python3-torch against BUILD_DIR/libfusedhead.so (its shapes are small), and check
# that every ```bash block parses.
#   bash scripts/check_readme.sh BUILD_DIR
# Prints "readme: N passed, N failed"; exits nonzero on failure.
set -uo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:?usage: scripts/check_readme.sh BUILD_DIR}" && pwd)
work="$build/readme-check"
rm -rf "$work"
mkdir -p "$work"
# Block k of language L goes to $work/block<k>.<L>.
awk -v dir="$work" '
  /^```[a-z]+$/ && !inside { lang = substr($0, 4); n++; file = dir "/block" n "." lang; inside = 1; next }
  /^```$/ && inside { inside = 0; close(file); next }
  inside { print > file }' "$src/README.md"
pass=0
fail=0
ok() { echo "readme: $1: OK"; pass=$((pass + 1)); }
bad() { echo "readme: $1: FAILED"; fail=$((fail + 1)); }

ncs=$(ls "$work"/*.c 2>/dev/null | wc -l)
npy=$(ls "$work"/*.python 2>/dev/null | wc -l)
[ "$ncs" -ge 1 ] && [ "$npy" -ge 1 ] || bad "README has no \`\`\`c or no \`\`\`python block"

cmake --install "$build" --prefix "$work/prefix" >"$work/install.log" 2>&1 || bad "install"
libdir=$(ls -d "$work"/prefix/lib* | head -n1)
export PKG_CONFIG_PATH="$libdir/pkgconfig"
for f in "$work"/*.c; do
  [ -f "$f" ] || continue
  name="C block $(basename "$f")"
  # shellcheck disable=SC2046
  if cc -std=c11 -Wall -Wextra -Werror "$f" -o "${f%.c}" $(pkg-config --cflags --libs fusedhead) -lm \
       >"$f.log" 2>&1 && LD_LIBRARY_PATH="$libdir" "${f%.c}" >>"$f.log" 2>&1; then
    ok "$name ($(tail -n 1 "$f.log"))"
  else
    bad "$name"; cat "$f.log"
  fi
done
for f in "$work"/*.python; do
  [ -f "$f" ] || continue
  name="Python block $(basename "$f")"
  if PYTHONDONTWRITEBYTECODE=1 FUSEDHEAD_LIBRARY="$build/libfusedhead.so" PYTHONPATH="$src/python" \
       /usr/bin/python3 "$f" >"$f.log" 2>&1; then
    ok "$name"
  else
    bad "$name"; cat "$f.log"
  fi
done
for f in "$work"/*.bash; do
  [ -f "$f" ] || continue
  if bash -n "$f" 2>"$f.log"; then ok "bash block $(basename "$f") parses"; else bad "bash block $(basename "$f")"; cat "$f.log"; fi
done
echo "readme: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
