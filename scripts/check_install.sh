#!/usr/bin/env bash
# Install a built tree into a scratch prefix, then build and run a tiny consumer against it:
# through find_package(fusedhead CONFIG) (shared and static targets), and through pkg-config,
# linking the shared library and, with `pkg-config --static`, the static one (whose private
# libraries include CUDA's runtime, cuBLAS and the C++ runtime in a CUDA build).
#   scripts/check_install.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
work="$build/install-check"
rm -rf "$work"
mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" >"$work/install.log"
libdir=$(ls -d "$work"/prefix/lib* | head -n1)

echo "== CMake package consumer"
cmake -S "$src/tests/install" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$work/prefix" >"$work/cmake.log"
cmake --build "$work/cmake" >>"$work/cmake.log"
LD_LIBRARY_PATH="$libdir" "$work/cmake/consumer_shared"
"$work/cmake/consumer_static"

echo "== pkg-config consumer"
export PKG_CONFIG_PATH="$libdir/pkgconfig"
cc -std=c11 -Wall -Wextra -Werror "$src/tests/install/consumer.c" -o "$work/consumer_pc" \
  $(pkg-config --cflags fusedhead) $(pkg-config --libs fusedhead) -lm
LD_LIBRARY_PATH="$libdir" "$work/consumer_pc"

echo "== pkg-config consumer, static: $(pkg-config --static --libs fusedhead)"
# -l:libfusedhead.a picks the archive over the shared library that sits beside it.
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror "$src/tests/install/consumer.c" -o "$work/consumer_pc_static" \
  $(pkg-config --cflags fusedhead) $(pkg-config --static --libs fusedhead | sed 's/-lfusedhead\b/-l:libfusedhead.a/') -lm
if ldd "$work/consumer_pc_static" | grep -q libfusedhead; then
  echo "consumer_pc_static links libfusedhead dynamically"; exit 1
fi
# cuBLAS stays a shared library: find it where pkg-config's -L says.
cudalibs=$(pkg-config --static --libs-only-L fusedhead | tr ' ' '\n' | sed -n 's/^-L//p' | paste -sd: -)
LD_LIBRARY_PATH="$cudalibs" "$work/consumer_pc_static"

echo "== public header alone, as C11 and as C++, no CUDA header on the path"
echo '#include <fusedhead.h>
int main(void) { return fh_version_number() > 0 ? 0 : 1; }' >"$work/hdr.c"
gcc -std=c11 -Wall -Wextra -Werror -pedantic -I"$work/prefix/include" -c "$work/hdr.c" -o "$work/hdr_c.o"
g++ -std=c++11 -Wall -Wextra -Werror -pedantic -x c++ -I"$work/prefix/include" -c "$work/hdr.c" -o "$work/hdr_cxx.o"
echo "install check: OK"
