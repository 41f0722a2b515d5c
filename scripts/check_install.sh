#!/usr/bin/env bash
# Install a built tree into a scratch prefix, then build and run a tiny consumer against it,
# once through find_package(fusedhead CONFIG) and once through pkg-config.
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

echo "== public header alone, as C11 and as C++, no CUDA header on the path"
echo '#include <fusedhead.h>
int main(void) { return fh_version_number() > 0 ? 0 : 1; }' >"$work/hdr.c"
gcc -std=c11 -Wall -Wextra -Werror -pedantic -I"$work/prefix/include" -c "$work/hdr.c" -o "$work/hdr_c.o"
g++ -std=c++11 -Wall -Wextra -Werror -pedantic -x c++ -I"$work/prefix/include" -c "$work/hdr.c" -o "$work/hdr_cxx.o"
echo "install check: OK"
