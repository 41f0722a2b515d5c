#!/usr/bin/env bash
# Fetch what scripts/gpu_check.sh needs on a GPU machine that has no network, into the git-ignored
# folder third_party/anchors, which then travels with the working tree:
#   - the two anchor packages, pure-Python wheels over Triton: liger-kernel (Liger-Kernel's
#     LigerFusedLinearCrossEntropyLoss) and cut-cross-entropy (Apple's Cut Cross-Entropy,
#     linear_cross_entropy), installed with --no-deps (torch and triton are expected there);
#   - a Criterion runtime (_criterion/: headers, libcriterion, the shared libraries it needs, a
#     pkg-config) copied from this Debian machine, for the Criterion gpu suite when the GPU machine has
#     no Criterion. gpu_check.sh uses it only where `pkg-config --exists criterion` fails, and
#     links only those of its libraries the GPU machine lacks.
#
#   bash scripts/fetch_anchors.sh [--no-criterion]
#   environment: LIGER_VERSION (default 0.8.5), CCE_VERSION (default 25.1.1), PYTHON (default python3)
#
# Needs pip with access to the package index (this machine, not the GPU machine). Prints the
# folder's size at the end; ANCHORS.txt in the folder records versions and wheel checksums.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=third_party/anchors
LIGER_VERSION=${LIGER_VERSION:-0.8.5}
CCE_VERSION=${CCE_VERSION:-25.1.1}
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
with_criterion=1
for a in "$@"; do
  case "$a" in
    --no-criterion) with_criterion=0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "fetch_anchors: unknown argument $a" >&2; exit 2 ;;
  esac
done

if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "fetch_anchors: '$PY -m pip' does not work here; set PYTHON to a Python with pip" >&2
  exit 1
fi

wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
echo "fetch_anchors: downloading liger-kernel==$LIGER_VERSION and cut-cross-entropy==$CCE_VERSION (no dependencies)"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$wheels" \
  "liger-kernel==$LIGER_VERSION" "cut-cross-entropy==$CCE_VERSION"

rm -rf "$dest.new"
mkdir -p "$dest.new"
# --no-compile: the GPU machine's Python may differ from this one, so no .pyc files are shipped.
"$PY" -m pip install -q --no-deps --no-compile --no-index --disable-pip-version-check \
  --target "$dest.new" "$wheels"/*.whl
rm -rf "$dest.new/bin"
find "$dest.new" -name __pycache__ -type d -prune -exec rm -rf {} +
{
  echo "# third_party/anchors: fetched by scripts/fetch_anchors.sh on $(date -u +%Y-%m-%dT%H:%MZ); not tracked by git."
  echo "# Put this folder on PYTHONPATH (scripts/gpu_check.sh does)."
  for w in "$wheels"/*.whl; do
    echo "$(basename "$w") sha256=$(sha256sum "$w" | cut -d' ' -f1)"
  done
} >"$dest.new/ANCHORS.txt"

# ---- the Criterion runtime -------------------------------------------------------------------
if [ "$with_criterion" = 1 ]; then
  if ! pkg-config --exists criterion 2>/dev/null; then
    echo "fetch_anchors: Criterion is not installed here (bash scripts/setup.sh installs it); no _criterion/ bundle"
  else
    cr="$dest.new/_criterion"
    mkdir -p "$cr/include" "$cr/lib/pkgconfig" "$cr/lib/deps" "$cr/bin"
    incdir=$(pkg-config --variable=includedir criterion)
    libdir=$(pkg-config --variable=libdir criterion)
    cp -r "$incdir/criterion" "$cr/include/"
    cp -L "$libdir/libcriterion.so" "$cr/lib/libcriterion.so.3"
    ln -sf libcriterion.so.3 "$cr/lib/libcriterion.so"
    # The shared libraries libcriterion needs, glibc's own excepted: gpu_check.sh links in only those
    # whose soname the GPU machine's loader does not know.
    ldd "$libdir/libcriterion.so" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r soname path; do
      case "$soname" in
        libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libresolv.so.*|ld-linux*) continue ;;
      esac
      cp -L "$path" "$cr/lib/deps/$soname"
    done
    # A pkg-config for machines without one (pkgconf and its library), behind a wrapper that finds them.
    if command -v pkgconf >/dev/null 2>&1; then
      pkgconf_bin=$(command -v pkgconf)
      cp -L "$pkgconf_bin" "$cr/bin/pkgconf.bin"
      ldd "$pkgconf_bin" | awk '$1 ~ /^libpkgconf/ {print $3}' | while read -r p; do cp -L "$p" "$cr/lib/deps/"; done
      cat >"$cr/bin/pkg-config" <<'EOF'
#!/bin/sh
# pkg-config for the bundled Criterion (pkgconf from the fetching machine).
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="$here/../lib/deps${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/pkgconf.bin" "$@"
EOF
      chmod +x "$cr/bin/pkg-config"
    fi
    # Relocatable: ${pcfiledir} is where this .pc file lies, wherever the tree was copied to.
    cat >"$cr/lib/pkgconfig/criterion.pc" <<EOF
prefix=\${pcfiledir}/../..
includedir=\${prefix}/include
libdir=\${prefix}/lib

Name: criterion
Description: Criterion $(pkg-config --modversion criterion) runtime bundled by scripts/fetch_anchors.sh
Version: $(pkg-config --modversion criterion)
Libs: -L\${libdir} -lcriterion
Cflags: -I\${includedir}
EOF
    echo "criterion $(pkg-config --modversion criterion) runtime in _criterion/ (from this machine's packages)" >>"$dest.new/ANCHORS.txt"
  fi
fi

rm -rf "$dest"
mv "$dest.new" "$dest"
echo "fetch_anchors: installed into $dest:"
sed -n '3,$p' "$dest/ANCHORS.txt" | sed 's/^/  /'
du -sh "$dest" | awk '{print "fetch_anchors: size " $1}'
[ -d "$dest/_criterion" ] && du -sh "$dest/_criterion" | awk '{print "fetch_anchors: of which _criterion " $1}'
exit 0
