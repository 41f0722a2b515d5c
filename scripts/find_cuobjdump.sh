# find_cuobjdump.sh: sourced by scripts/sass_table.sh and scripts/sm90_sass_check.sh (docs/sass.md).
# fh_find_cuobjdump NAME ROOT [PYTHON...]: sets $cuobjdump (and $nvdisasm, which cuobjdump -sass
# runs, put on PATH) from $CUOBJDUMP, PATH, the CUDA toolkit, or a private pip install
# (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm) into ${FH_TOOLS_DIR:-ROOT/build-tools}/cuda-binutils.
# pip --target writes a private folder, so PEP 668 (Debian's externally managed python) does not
# apply. Returns 0 when found, 3 when not there and not installable (messages prefixed by NAME).
fh_find_cuobjdump() {
  local name=$1 root=$2 c p ok=0
  shift 2
  local tools="${FH_TOOLS_DIR:-$root/build-tools}/cuda-binutils"
  _fh_usable() { # a cuobjdump that runs, with an nvdisasm beside it or on PATH
    local d
    [ -x "$1" ] || return 1
    d="$(dirname "$1")"
    { [ -x "$d/nvdisasm" ] || command -v nvdisasm >/dev/null; } || return 1
    "$1" --version >/dev/null 2>&1
  }
  _fh_in_tools() {
    cuobjdump="$(find "$tools" -type f -name cuobjdump 2>/dev/null | head -n 1)"
    nvdisasm="$(find "$tools" -type f -name nvdisasm 2>/dev/null | head -n 1)"
    [ -n "$cuobjdump" ] && [ -n "$nvdisasm" ] && chmod +x "$cuobjdump" "$nvdisasm" &&
      PATH="$(dirname "$nvdisasm"):$PATH" _fh_usable "$cuobjdump"
  }
  cuobjdump=""
  nvdisasm=""
  for c in "${CUOBJDUMP:-}" "$(command -v cuobjdump || true)" /usr/local/cuda/bin/cuobjdump; do
    if [ -n "$c" ] && _fh_usable "$c"; then cuobjdump="$c"; break; fi
  done
  if [ -z "$cuobjdump" ] && ! _fh_in_tools; then
    echo "$name: installing cuobjdump and nvdisasm (pip: nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm) into $tools"
    for p in "$@" /usr/bin/python3; do
      [ -x "$p" ] || continue
      if PIP_ROOT_USER_ACTION=ignore "$p" -m pip install --quiet --disable-pip-version-check \
          --upgrade --target "$tools" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm >&2; then
        ok=1; break
      fi
    done
    if [ $ok -eq 0 ] || ! _fh_in_tools; then
      echo "$name: ERROR: cuobjdump/nvdisasm are not installed and 'python3 -m pip install" \
           "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm' failed: no SASS evidence (exit 3)" >&2
      return 3
    fi
  fi
  if [ -n "$nvdisasm" ]; then export PATH="$(dirname "$nvdisasm"):$PATH"; fi
  return 0
}
