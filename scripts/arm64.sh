#!/usr/bin/env bash
# Run lora-edge's device side on 64-bit ARM, here, under emulation: an arm64 Debian root (debootstrap +
# qemu-user-static through binfmt_misc), ONNX Runtime's aarch64 wheel and the device side of this checkout inside it,
# then the checks of scripts/arm64_check.py on packages exported here on x86 (scripts/arm64_reference.py), and the
# native kernel's NEON paths (cross-compiled with g++-aarch64-linux-gnu) against its portable C++ through
# tests/test_native.py's operator tests.
#
#   scripts/arm64.sh [--light] [--fresh]      (as root: it installs host packages, mounts, chroots)
#
#   --light   tiny packages and a few operator cases only (tests/test_arm64.py runs this; ~10 min once the root exists)
#   --fresh   rebuild the arm64 root and re-export every package
#
# Environment: LORA_EDGE_ARM64_DIR (default /var/tmp/lora-edge-arm64: the root, the packages, the kernels),
# LORA_EDGE_ARM64_MIRROR and LORA_EDGE_ARM64_SUITE (default: the Debian source and release this host's apt uses).
# Speed on ARM cannot be measured under emulation: nothing here times anything.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
DIR=${LORA_EDGE_ARM64_DIR:-/var/tmp/lora-edge-arm64}
ROOT=$DIR/root
CHECK=/opt/lora-edge-check        # inside the root: packages, references, kernels
SRC=/opt/lora-edge-src            # inside the root: the copy of this checkout that pip installs
HOST_PY=${HOST_PYTHON:-$HERE/.venv/bin/python}
LIGHT=0
FRESH=0
for arg in "$@"; do
  case $arg in
    --light) LIGHT=1 ;;
    --fresh) FRESH=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "arm64.sh: unknown argument $arg (use --light, --fresh)" >&2; exit 2 ;;
  esac
done

RESULTS=()
FAILED=0
say() { printf '== %s\n' "$*"; }
result() {  # result PASS|FAIL text
  RESULTS+=("$1  $2")
  [ "$1" = PASS ] || FAILED=1
}
die() { echo "arm64.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it installs debootstrap/qemu-user-static, mounts /proc in the root and chroots"
[ -x "$HOST_PY" ] || die "no $HOST_PY: run scripts/setup.sh first (the x86 side exports the packages), or set HOST_PYTHON"

# -- host tools -------------------------------------------------------------------------------------------
host_tools() {
  local need=()
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  command -v update-binfmts >/dev/null || need+=(binfmt-support)
  command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} (apt)"
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
  fi
  # aarch64 binaries run through qemu via binfmt_misc; the F flag opens the interpreter now, so a chroot needs no copy
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt_misc has qemu-aarch64 but it is disabled"
}

# The Debian source this host's apt uses (verified there as here: debootstrap checks the Release signature with
# Debian's archive keyring), unless LORA_EDGE_ARM64_MIRROR names one.
debian_source() {
  SUITE=${LORA_EDGE_ARM64_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}
  [ -n "$SUITE" ] || die "cannot tell this host's Debian release; set LORA_EDGE_ARM64_SUITE (e.g. bookworm)"
  MIRROR=${LORA_EDGE_ARM64_MIRROR:-$(apt-get indextargets --format '$(REPO_URI)|$(RELEASE)|$(ORIGIN)' 2>/dev/null |
    awk -F'|' -v s="$SUITE" '$2 == s && $3 == "Debian" { print $1; exit }')}
  [ -n "$MIRROR" ] || die "no Debian source for $SUITE in this host's apt sources; set LORA_EDGE_ARM64_MIRROR to a Debian mirror"
}

in_root() {  # in_root CMD...: run in the arm64 root with only /proc mounted (the host's /sys crashes ORT's CPU probe)
  chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin:/usr/sbin:/sbin LANG=C.UTF-8 OMP_NUM_THREADS=1 \
    PIP_CERT=/opt/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 ${QEMU_CPU:+QEMU_CPU=$QEMU_CPU} "${EXTRA_ENV[@]}" "$@"
}
EXTRA_ENV=()

mount_proc() {
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  # a leftover /sys mount (debootstrap's) must not be visible to ONNX Runtime
  if mountpoint -q "$ROOT/sys"; then umount -l "$ROOT/sys"; fi
}
cleanup() {
  [ -d "$ROOT/proc" ] && mountpoint -q "$ROOT/proc" && umount -l "$ROOT/proc" || true
}
trap cleanup EXIT

# -- the arm64 root (built once, cached) ---------------------------------------------------------------------
ORT_VERSION=$("$HOST_PY" -c 'import onnxruntime; print(onnxruntime.__version__)')
REQS="onnxruntime==$ORT_VERSION numpy tokenizers jinja2 click pytest onnx"  # device side + the operator tests' tools

build_root() {
  if [ $FRESH = 1 ]; then cleanup; rm -rf --one-file-system "$ROOT"; fi
  if [ ! -e "$ROOT/.lora-edge-root" ]; then
    debian_source
    local tmp=$DIR/root.partial
    for m in proc sys; do if mountpoint -q "$tmp/$m" 2>/dev/null; then umount -l "$tmp/$m"; fi; done  # an interrupted run's
    rm -rf --one-file-system "$tmp" && mkdir -p "$DIR"
    say "debootstrap arm64 $SUITE from $MIRROR (first run only; ~10-20 min under emulation)"
    debootstrap --arch=arm64 --foreign --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
      --include=python3,python3-venv,ca-certificates,libgomp1 "$SUITE" "$tmp" "$MIRROR" >"$DIR/debootstrap.log" 2>&1 ||
      die "debootstrap (first stage) failed: see $DIR/debootstrap.log"
    chroot "$tmp" /debootstrap/debootstrap --second-stage >>"$DIR/debootstrap.log" 2>&1 ||
      die "debootstrap (second stage) failed: see $DIR/debootstrap.log"
    for m in proc sys; do if mountpoint -q "$tmp/$m"; then umount -l "$tmp/$m"; fi; done
    chroot "$tmp" /usr/bin/python3 -m venv /opt/venv
    touch "$tmp/.lora-edge-root"
    mv "$tmp" "$ROOT"
  fi
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"   # PyPI from inside
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/opt/host-ca.crt"  # the host's trust store, for pip's TLS checks
  mount_proc
  if [ "$(cat "$ROOT/opt/venv/.reqs" 2>/dev/null)" != "$REQS" ]; then
    say "pip install (aarch64 wheels): $REQS"
    in_root pip install -q $REQS || die "pip install in the arm64 root failed"
    echo "$REQS" >"$ROOT/opt/venv/.reqs"
  fi
  # the device side from this checkout: its files only (no venv, no git), installed without dependencies
  rm -rf "$ROOT$SRC" && mkdir -p "$ROOT$SRC"
  tar -C "$HERE" --exclude=.venv --exclude=.git --exclude='__pycache__' --exclude='*.egg-info' --exclude=build \
    -cf - pyproject.toml README.md lora_edge tests scripts | tar -C "$ROOT$SRC" -xf -
  in_root pip install -q --no-deps --no-build-isolation "$SRC" 2>/dev/null || in_root pip install -q --no-deps "$SRC" ||
    die "pip install --no-deps of the checkout failed in the arm64 root"
  result PASS "arm64 root: $(in_root python -c 'import platform, onnxruntime as o; print(platform.machine(), "python", platform.python_version(), "onnxruntime", o.__version__)' 2>/dev/null)"
}

# -- packages and references, exported here (x86) ---------------------------------------------------------------
export_references() {
  local args=("$ROOT$CHECK") log=$DIR/reference.log
  [ $LIGHT = 1 ] && args+=(--light)
  [ $FRESH = 1 ] || args+=(--reuse)
  say "exporting the packages and their x86 / PyTorch references ($log)"
  if OMP_NUM_THREADS=1 "$HOST_PY" "$HERE/scripts/arm64_reference.py" "${args[@]}" >"$log" 2>&1; then
    result PASS "x86 exports and references: $(grep -c -E ': (x86|reused)' "$log") packages ($(grep -c ': reused' "$log") reused)"
  else
    result FAIL "x86 exports and references: see $log"; summary
  fi
}

# -- the native kernel for aarch64, cross-compiled by build.py's compile_library ---------------------------------
MARCHES=(armv8.2-a+dotprod armv8-a armv8-a+nosimd)  # NEON with SDOT, NEON without it, no NEON: the portable C++
cross_kernels() {
  mkdir -p "$ROOT$CHECK/kernels"
  for m in "${MARCHES[@]}"; do
    local lib=$ROOT$CHECK/kernels/k-$m.so
    if [ ! -e "$lib" ] || [ -n "$(find "$HERE/lora_edge/native/src" -newer "$lib" -print -quit)" ]; then
      say "cross-compiling the kernel for -march=$m"
      if ! "$HOST_PY" -c 'import sys; from pathlib import Path; from lora_edge.native.build import BUNDLED_INCLUDE, compile_library
compile_library(Path(sys.argv[1]), BUNDLED_INCLUDE, sys.argv[2], "aarch64-linux-gnu-g++")' "$lib" "$m"; then
        result FAIL "kernel cross-compiled for -march=$m"; continue
      fi
    fi
    result PASS "kernel cross-compiled for -march=$m (aarch64-linux-gnu-g++, bundled ONNX Runtime headers)"
  done
}

# -- in the root -------------------------------------------------------------------------------------------------
march_detection() {  # build.py's `native` on aarch64: from the CPU's feature bits, which QEMU_CPU changes
  local got
  for cpu in max cortex-a72; do
    got=$(QEMU_CPU=$cpu in_root python -c 'from lora_edge.native.build import target_march; print(target_march("native"))' 2>/dev/null || true)
    want=$([ $cpu = max ] && echo armv8.2-a+dotprod || echo armv8-a)
    [ "$got" = "$want" ] && result PASS "build.py picks -march=$got on an emulated $cpu" ||
      result FAIL "build.py picks -march=$got on an emulated $cpu (expected $want)"
  done
}

run_checks() {  # the packages (scripts/arm64_check.py), one PASS/FAIL line per check
  local log=$DIR/check.log kernels=()
  for m in "${MARCHES[@]}"; do kernels+=(--kernel "$CHECK/kernels/k-$m.so"); done
  say "running the packages in the arm64 root ($log)"
  in_root python "$SRC/scripts/arm64_check.py" "$CHECK" "${kernels[@]}" 2>&1 | tee "$log" | grep -v -E 'cpuinfo|cpuid_info' || true
  grep -q -E '^(PASS|FAIL)' "$log" || result FAIL "the package checks printed nothing: see $log"
  while IFS= read -r line; do result "${line%%  *}" "${line#*  }"; done < <(grep -E '^(PASS|FAIL)' "$log")
}

operator_tests() {  # tests/test_native.py's operator tests, against each build (no torch: the operators alone)
  local sel='(operator or block_offset or chunked_delta or matmul_q4 or matmul_q8 or branch_node or q8x) and not package and not real and not paths'
  local light='matmul_q4_matches or matmul_q8_matches or (q8x_branch_node and rows1)'
  [ $LIGHT = 1 ] && sel=$light
  for m in "${MARCHES[@]}"; do
    for cpu in max cortex-a72; do
      [ $cpu = cortex-a72 ] && [ "$m" = armv8.2-a+dotprod ] && continue  # (no SDOT on that CPU)
      # light: each build once, NEON without SDOT on a CPU without it
      [ $LIGHT = 1 ] && [ "$cpu $m" != "max armv8.2-a+dotprod" ] && [ "$cpu $m" != "cortex-a72 armv8-a" ] &&
        [ "$cpu $m" != "max armv8-a+nosimd" ] && continue
      local log=$DIR/ops-$m-$cpu.log k=$light
      [ "$cpu $m" = "max armv8.2-a+dotprod" ] && k=$sel  # every operator test on the best path (~5 s a test emulated)
      say "operator tests: kernel -march=$m on an emulated $cpu"
      EXTRA_ENV=(LORA_EDGE_KERNEL_LIB="$CHECK/kernels/k-$m.so")
      if QEMU_CPU=$cpu in_root sh -c "cd $SRC && python -m pytest -q -p no:cacheprovider tests/test_native.py -k '$k'" >"$log" 2>&1; then
        result PASS "test_native operator tests, -march=$m on emulated $cpu: $(tail -1 "$log")"
      else
        result FAIL "test_native operator tests, -march=$m on emulated $cpu: $(tail -1 "$log") (see $log)"
      fi
      EXTRA_ENV=()
    done
  done
}

native_build() {  # the kernel compiled in the root by build.py (what `lora-edge build-kernel` does on a board)
  local log=$DIR/native-build.log
  if [ ! -x "$ROOT/usr/bin/g++" ]; then
    say "apt-get install g++ in the arm64 root (first run only)"
    { in_root apt-get update -q && in_root apt-get install -y -q --no-install-recommends g++; } >"$log" 2>&1 || { result FAIL "g++ in the arm64 root: see $log"; return; }
  fi
  # one compile under emulation takes minutes: the builds for the other paths are the cross-compiled ones above
  say "lora-edge build-kernel in the arm64 root (compiled there, under emulation: slow), then its operator tests"
  if in_root sh -c "cd $SRC && LORA_EDGE_CACHE=/tmp/lora-edge-cache lora-edge build-kernel --force && \
       LORA_EDGE_CACHE=/tmp/lora-edge-cache python -m pytest -q -p no:cacheprovider tests/test_native.py \
       -k 'matmul_q4_matches or matmul_q8_matches or (q8x_branch_node and rows1)'" >>"$log" 2>&1; then
    result PASS "kernel built in the root by lora-edge build-kernel, operator tests: $(tail -1 "$log")"
  else
    result FAIL "kernel built in the root by lora-edge build-kernel, operator tests: $(tail -1 "$log") (see $log)"
  fi
}

summary() {
  echo
  echo "==================== arm64 summary ($([ $LIGHT = 1 ] && echo light || echo full)) ===================="
  printf '%s\n' "${RESULTS[@]}"
  local pass fail
  pass=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^PASS' || true)
  fail=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^FAIL' || true)
  echo "==================== $pass passed, $fail failed ===================="
  echo "(speed on ARM is not measured: under emulation it means nothing)"
  exit $FAILED
}

host_tools
build_root
[ "${ARM64_ROOT_ONLY:-0}" = 1 ] && summary
export_references
cross_kernels
march_detection
run_checks
operator_tests
[ $LIGHT = 1 ] || native_build
summary
