#!/usr/bin/env bash
# Build modes' CPU kernel as its aarch64 builds (NEON, SVE256) and check them against at::linear,
# on an x86-64 machine: cross-compiled with GCC and run under qemu-user, SVE256 on a CPU with
# 256-bit SVE vectors (correctness only; qemu says nothing about speed). Needs Debian's g++-aarch64-linux-gnu and qemu-user-static, and downloads the
# aarch64 wheel of the installed torch version from PyPI (~430 MB, cached in $WORK).
#
#     apt-get install g++-aarch64-linux-gnu qemu-user-static
#     tools/aarch64/check.sh            # from the repository root, in the project's environment
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${WORK:-$HOME/.cache/modes-aarch64}
for tool in aarch64-linux-gnu-g++ qemu-aarch64-static; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install g++-aarch64-linux-gnu qemu-user-static" >&2; exit 2; }
done
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")
PY=$(python -c "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')")
mkdir -p "$WORK"
cd "$WORK"

# 1. The aarch64 wheel of the same torch: its headers and libraries.
if [ ! -f "torch-$TORCH_VERSION/lib/libtorch_cpu.so" ]; then
  pip download "torch==$TORCH_VERSION" --platform manylinux_2_28_aarch64 --only-binary=:all: --no-deps \
    --python-version "$PY" -d wheels
  python - "$TORCH_VERSION" <<'PY'
import sys, zipfile, glob, os, shutil
version = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"wheels/torch-{version}-*aarch64.whl")[0])
for name in wheel.namelist():
    if name.startswith(("torch/include/", "torch/lib/")) and "cuda" not in name.rsplit("/", 1)[-1]:
        wheel.extract(name, "unpacked")
shutil.rmtree(f"torch-{version}", ignore_errors=True)
os.rename("unpacked/torch", f"torch-{version}")
PY
fi
TORCH="$WORK/torch-$TORCH_VERSION"

# 2. PyPI's aarch64 wheel is built with CUDA: libtorch_cpu links libcudart and libcupti. Stand-ins
#    whose every call fails let it load without a GPU runtime (the CPU kernels never call them).
mkdir -p stubs
for lib in cudart cupti; do
  symbols=$(aarch64-linux-gnu-nm -D --undefined-only "$TORCH/lib/libtorch_cpu.so" | awk -v l="lib$lib.so" '$0 ~ "@"l {split($2, s, "@"); print s[1]}')
  [ -n "$symbols" ] || continue
  soname=$(aarch64-linux-gnu-nm -D --undefined-only "$TORCH/lib/libtorch_cpu.so" | grep -o "@lib$lib\.so\.[0-9]*" | head -1 | cut -c2-)
  for symbol in $symbols; do echo "int $symbol(void) { return 100; }"; done > "stubs/$lib.c"
  echo "$soname { global: *; };" > "stubs/$lib.map"
  aarch64-linux-gnu-gcc -shared -fPIC -o "stubs/$soname" "stubs/$lib.c" -Wl,--version-script="stubs/$lib.map" -Wl,-soname,"$soname"
done

# 3. What the target's libraries read at start-up (oneDNN's and cpuinfo's CPU detection), as an
#    aarch64 machine (a Neoverse N1) shows it; qemu looks under its -L prefix before the host's.
rm -rf sysroot && mkdir -p sysroot/proc
for entry in /usr/aarch64-linux-gnu/*; do ln -s "$entry" sysroot/; done
for cpu in 0 1; do
  mkdir -p "sysroot/sys/devices/system/cpu/cpu$cpu/regs/identification"
  echo 0x00000000413fd0c1 > "sysroot/sys/devices/system/cpu/cpu$cpu/regs/identification/midr_el1"
  printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$cpu" >> sysroot/proc/cpuinfo
done

# 4. Each build with its own flags (modes.engine.kernels.ISAS), then the check on a CPU it runs on.
status=0
for build in neon:max sve256:max,sve256=on; do
  isa=${build%%:*}
  FLAGS=$(cd "$ROOT" && python -c "from modes.engine.kernels import ISAS; print(' '.join(ISAS['$isa'].build_flags()))")
  # shellcheck disable=SC2086  # FLAGS is a list of flags
  aarch64-linux-gnu-g++ -std=c++20 $FLAGS -I "$ROOT/src/modes/engine/kernels" -I "$TORCH/include" \
    -I "$TORCH/include/torch/csrc/api/include" "$HERE/kernel_check.cpp" -o "kernel_check_$isa" \
    -L "$TORCH/lib" -ltorch_cpu -lc10 -Wl,-rpath-link,"$TORCH/lib:$WORK/stubs" -Wl,--allow-shlib-undefined
  LD_LIBRARY_PATH="$TORCH/lib:$WORK/stubs" OMP_NUM_THREADS=2 \
    qemu-aarch64-static -cpu "${build#*:}" -L "$WORK/sysroot" "./kernel_check_$isa" || status=1
done
exit $status
