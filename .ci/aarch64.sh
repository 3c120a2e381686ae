#!/usr/bin/env bash
# The aarch64 job (issue 32): wasi-tool as a Raspberry Pi runs it, under qemu-user with the
# ISA of the Pi's CPU enforced (QEMU_CPU=cortex-a72: no LSE atomics, dotprod or fp16
# arithmetic, as a Pi 4; cortex-a76: a Pi 5). Everything is built natively and only the runs are
# emulated (../shared/docs/aarch64.md, docs/raspberry-pi.md):
#   1. qemu-user-static + binfmt-support from Debian (binfmt starts qemu for every arm64 exec);
#   2. an arm64 Python 3.11 from Debian's packages, downloaded with a private apt state and
#      unpacked with dpkg -x (no emulated dpkg);
#   3. this clone and its dependencies resolved by uv for aarch64-manylinux_2_36 / 3.11 from
#      pyproject.toml alone: the set `pip install` gives a Pi 4 user, so red here = a Pi 4
#      user is broken;
#   4. per CPU model: finetune 3 steps (random-init ViT-Tiny, 32 px, patch 16, digits, wasi),
#      export --onnx, the inference runner on the export, the ONNX logits of a fixed input
#      against the x86 export of the same artifact (max diff <= 1e-4 x max(1, |logits|)), and
#      doctor (must pass: exit 0). On cortex-a72 also doctor with onnxruntime 1.21.0 on the
#      path: it must report the SIGILL and exit 1, not crash.
# Emulated compute is ~200x slower than native: timings here mean nothing.
#
# Needs root (apt-get, mount, chroot) on Debian/Ubuntu x86_64 and PyPI/Debian access.
#   WASI_AARCH64_CPUS  CPU models to run, space-separated (default "cortex-a72"; add
#                      cortex-a76 for the Pi 5 half: about 7 more minutes)
#   PYTHON             the host's Python with wasi-tool's dependencies (default python3)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CPUS=${WASI_AARCH64_CPUS:-cortex-a72}
PY=${PYTHON:-python3}
STEP_TIMEOUT=${WASI_AARCH64_STEP_TIMEOUT:-2400}  # seconds per emulated command: a hang must not eat CI's 90 minutes
T0=$SECONDS

log() { printf '[aarch64 %4ds] %s\n' $((SECONDS - T0)) "$*"; }
die() {
  log "FAIL: $*"
  exit 1
}

for cpu in $CPUS; do
  case $cpu in cortex-a72 | cortex-a76) ;; *) die "unknown CPU model $cpu (cortex-a72 | cortex-a76)" ;; esac
done
[ "$(id -u)" = 0 ] || die "needs root (apt-get, mount, chroot)"
[ "$(uname -m)" = x86_64 ] || die "runs on an x86_64 host (it emulates aarch64)"

W=$(mktemp -d /tmp/wasi-aarch64.XXXXXX)
SYS=$W/sys

cleanup() {
  local rc=$? m left=""
  # every mount under $SYS, deepest first (this job made them all)
  for m in $(awk -v root="$SYS/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || left="$left $m"
  done
  if [ -n "$left" ]; then
    echo "[aarch64] could not unmount:$left; $W left in place" >&2
  else
    rm -rf --one-file-system "$W"
  fi
  log "wall time $((SECONDS - T0)) s (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- 1. qemu-user and binfmt ------------------------------------------------------------------
if ! command -v qemu-aarch64-static >/dev/null || ! command -v update-binfmts >/dev/null; then
  log "installing qemu-user-static and binfmt-support"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support >/dev/null
fi
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
  mount -t binfmt_misc binfmt_misc "$BINFMT" || die "cannot mount binfmt_misc"
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
  update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi
[ -e "$BINFMT/qemu-aarch64" ] || die "qemu-aarch64 is not registered with binfmt_misc"
grep -q '^enabled' "$BINFMT/qemu-aarch64" || die "binfmt qemu-aarch64 is disabled"
QEMU_INTERP=$(awk '/^interpreter/ {print $2}' "$BINFMT/qemu-aarch64")
QEMU_FLAGS=$(awk '/^flags/ {print $2}' "$BINFMT/qemu-aarch64")
log "$(qemu-aarch64-static --version | head -1); binfmt interpreter $QEMU_INTERP, flags $QEMU_FLAGS"

# -- 2. an arm64 Python from Debian's packages ------------------------------------------------
log "arm64 Python 3.11 from Debian packages (private apt state)"
# the host's own Debian mirror, else deb.debian.org
MIRROR=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
  | grep -v security | grep -E '/debian/?$' | head -1 || true)
if [ -z "$MIRROR" ]; then
  MIRROR=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | grep -v security \
    | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | head -1 || true)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$KEYRING" ] || die "no $KEYRING (apt-get install debian-archive-keyring)"
A=$W/apt
mkdir -p "$A"/lists/partial "$A"/cache/archives/partial "$A"/etc/apt.conf.d \
  "$A"/etc/preferences.d "$A"/etc/trusted.gpg.d "$W/debs" "$SYS"
touch "$A/status"
echo "deb [arch=arm64 signed-by=$KEYRING] $MIRROR bookworm main" >"$A/etc/sources.list"
APT_OPTS=(
  -o "Dir::Etc=$A/etc" -o "Dir::Etc::sourcelist=$A/etc/sources.list" -o "Dir::Etc::sourceparts=-"
  -o "Dir::State=$A" -o "Dir::State::status=$A/status" -o "Dir::State::lists=$A/lists"
  -o "Dir::Cache=$A/cache" -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64"
  -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
)
apt-get "${APT_OPTS[@]}" update -qq
# the recursive depends, without what only a package manager or perl needs
mapfile -t DEBS < <(apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests \
  --no-conflicts --no-breaks --no-replaces --no-enhances \
  python3-minimal python3.11 libpython3.11-stdlib libstdc++6 libgomp1 dash \
  | grep -E '^[a-z0-9]' | sort -u \
  | grep -vE '^(dpkg|perl|perl-base|perl-modules-.*|libperl.*|libgdbm-compat4|install-info|debianutils|tar|mailcap|mime-support|debconf.*)$')
(cd "$W/debs" && apt-get "${APT_OPTS[@]}" download -qq "${DEBS[@]}")
for deb in "$W"/debs/*.deb; do dpkg -x "$deb" "$SYS"; done
ln -sf python3.11 "$SYS/usr/bin/python3"
mkdir -p "$SYS"/{proc,sys,dev,tmp,root,work,opt} "$SYS/etc/ssl/certs"
chmod 1777 "$SYS/tmp"
echo 'root:x:0:0:root:/root:/bin/sh' >"$SYS/etc/passwd"
echo 'root:x:0:' >"$SYS/etc/group"
cp /etc/ssl/certs/ca-certificates.crt "$SYS/etc/ssl/certs/" 2>/dev/null || true
if [[ "$QEMU_FLAGS" != *F* ]]; then  # without the F flag the interpreter must exist inside
  mkdir -p "$SYS$(dirname "$QEMU_INTERP")"
  cp "$(readlink -f "$QEMU_INTERP")" "$SYS$QEMU_INTERP"
fi
log "${#DEBS[@]} packages from $MIRROR: $(du -sh "$SYS" | cut -f1)"

# -- 3. the wheels a Pi 4 user gets, resolved for aarch64 -------------------------------------
if ! "$PY" -m uv --version >/dev/null 2>&1; then
  log "pip install uv"
  "$PY" -m pip install -q uv
fi
# the clone's files (tracked and untracked, not ignored) so the build writes nothing into it
mkdir -p "$W/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z -co --exclude-standard | tar -c --null -T - -f -) | tar -x -C "$W/src"
else
  tar -c -C "$REPO" --exclude=.git --exclude=runs --exclude='*.egg-info' --exclude=build . | tar -x -C "$W/src"
fi
log "resolving wasi-tool's dependencies for aarch64-manylinux_2_36 / cp311 with uv"
UV_CACHE_DIR=$W/uv-cache "$PY" -m uv pip install -q --no-config --no-progress \
  --python-platform aarch64-manylinux_2_36 --python-version 3.11 \
  --target "$SYS/opt/site" "$W/src"
WHEELS=$(cd "$SYS/opt/site" && ls -d ./*.dist-info | sed -E 's|^\./||; s|\.dist-info$||' \
  | grep -iE '^(torch|torchvision|onnxruntime|onnx|numpy|timm|scikit_learn|wasi_tool)-' | tr '\n' ' ')
log "wheels: $WHEELS($(du -sh "$SYS/opt/site" | cut -f1))"
if ls -d "$SYS"/opt/site/nvidia* "$SYS"/opt/site/triton* >/dev/null 2>&1; then
  die "the aarch64 resolution pulled CUDA wheels (nvidia/triton): the pins in pyproject.toml let a CUDA torch through"
fi
# onnxruntime 1.21.0 beside it, for doctor's SIGILL report (known to die at import on ARMv8.0)
UV_CACHE_DIR=$W/uv-cache "$PY" -m uv pip install -q --no-config --no-progress --no-deps \
  --python-platform aarch64-manylinux_2_36 --python-version 3.11 \
  --target "$SYS/opt/bad-ort" onnxruntime==1.21.0

# -- 4. mounts --------------------------------------------------------------------------------
mount -t proc proc "$SYS/proc"
mount -t sysfs sysfs "$SYS/sys"
mount -t tmpfs -o mode=755,size=64m tmpfs "$SYS/dev" # a minimal /dev: nothing of the host's
for node in null:3 zero:5 random:8 urandom:9; do
  name=${node%:*}
  if ! mknod -m 666 "$SYS/dev/$name" c 1 "${node#*:}" 2>/dev/null; then
    touch "$SYS/dev/$name" # no CAP_MKNOD: the host's node, bound
    mount --bind "/dev/$name" "$SYS/dev/$name"
  fi
done
mkdir -m 1777 "$SYS/dev/shm"
ln -s /proc/self/fd "$SYS/dev/fd"

# an ARM cpuinfo per model (qemu 7.2 passes the host's x86 text through, and
# `import onnxruntime` segfaults on it): the recorded Pi text, one block per host core
make_cpuinfo() { # fixture out
  "$PY" - "$1" "$2" "$(nproc)" <<'EOF'
import sys
text = open(sys.argv[1]).read()
blocks = text.strip().split("\n\n")
first, trailer = blocks[0], [b for b in blocks if not b.startswith("processor")]
lines = first.splitlines()[1:]
out = [f"processor\t: {i}\n" + "\n".join(lines) for i in range(int(sys.argv[3]))]
open(sys.argv[2], "w").write("\n\n".join(out + trailer) + "\n")
EOF
}

CHROOT=$(command -v chroot || echo /usr/sbin/chroot)
inside() { # cpu pythonpath command... : run under qemu with that CPU model, a clean environment
  local cpu=$1 path=$2
  shift 2
  timeout "$STEP_TIMEOUT" env -i HOME=/root PATH=/usr/bin:/bin PYTHONPATH="$path" LANG=C.UTF-8 \
    QEMU_CPU="$cpu" "$CHROOT" "$SYS" "$@"
}
host_py() { PYTHONPATH="$REPO" OMP_NUM_THREADS=2 "$PY" "$@"; }

LOGITS=$SYS/work/logits.py
cp "$REPO/.ci/aarch64_logits.py" "$LOGITS"
"$PY" "$LOGITS" input "$SYS/work/input.npy"

# -- 5. the runs ------------------------------------------------------------------------------
for cpu in $CPUS; do
  tag=${cpu#cortex-}
  case $cpu in cortex-a72) fixture=pi4 ;; cortex-a76) fixture=pi5 ;; esac
  make_cpuinfo "$REPO/tests/fixtures/cpuinfo/$fixture.txt" "$W/cpuinfo.$tag"
  mount --bind "$W/cpuinfo.$tag" "$SYS/proc/cpuinfo"
  out=/work/$tag
  mkdir -p "$SYS$out"
  log "== QEMU_CPU=$cpu ($fixture's /proc/cpuinfo)"
  inside "$cpu" /opt/site python3 -c 'import platform, sys; print("guest:", platform.machine(), sys.version.split()[0])'

  t=$SECONDS
  inside "$cpu" /opt/site python3 -m wasi_tool finetune --random-init --arch vit_tiny_patch16_224 \
    --img-size 32 --num-classes 10 --method wasi --data digits --epochs 1 --max-steps 3 \
    --batch-size 16 --threads 2 --out "$out/ft" --json "$out/ft.json" >/dev/null \
    || die "finetune under $cpu"
  log "$cpu finetune 3 steps: $((SECONDS - t)) s; $("$PY" "$LOGITS" summary "$SYS$out/ft.json")"

  t=$SECONDS
  inside "$cpu" /opt/site python3 -m wasi_tool export "$out/ft" --onnx --out "$out/onnx" \
    --json "$out/export.json" >/dev/null || die "export --onnx under $cpu"
  log "$cpu export --onnx (checked against torch there): $((SECONDS - t)) s"

  t=$SECONDS
  inside "$cpu" /opt/site python3 /opt/site/wasi_tool/bench/runner.py "$out/onnx/model.onnx" \
    --batch 1 --threads 2 --warmup 1 --repeats 3 >"$W/runner.$tag.json" || die "runner under $cpu"
  runner=$("$PY" "$LOGITS" runner "$W/runner.$tag.json") || die "the runner's output under $cpu: $runner"
  log "$cpu runner on the export: $((SECONDS - t)) s; $runner"

  # parity: the same artifact exported on this x86 host, the same fixed input
  inside "$cpu" /opt/site python3 /work/logits.py run "$out/onnx/model.onnx" /work/input.npy "$out/logits.npy" \
    || die "ONNX logits under $cpu"
  host_py -m wasi_tool export "$SYS$out/ft" --onnx --out "$W/x86-$tag" --json "$W/x86-$tag.json" >/dev/null \
    || die "the x86 export of the $cpu artifact"
  host_py "$LOGITS" run "$W/x86-$tag/model.onnx" "$SYS/work/input.npy" "$W/x86-$tag.npy"
  # the x86 export of the same artifact must match the arm one's (scaled as export --atol)
  parity=$("$PY" "$LOGITS" compare "$SYS$out/logits.npy" "$W/x86-$tag.npy") \
    || die "$cpu ONNX logits differ from x86's: $parity"
  log "$cpu vs x86 ONNX logits: $parity"

  t=$SECONDS
  rc=0
  inside "$cpu" /opt/site python3 -m wasi_tool doctor --json "$out/doctor.json" >"$W/doctor.$tag.txt" 2>&1 || rc=$?
  sed 's/^/    /' "$W/doctor.$tag.txt"
  [ "$rc" = 0 ] || die "doctor under $cpu exited $rc (the pinned set must pass)"
  log "$cpu doctor: $((SECONDS - t)) s, exit 0"

  if [ "$cpu" = cortex-a72 ]; then
    t=$SECONDS
    rc=0
    inside "$cpu" /opt/bad-ort:/opt/site python3 -m wasi_tool doctor --packages onnxruntime \
      --json "$out/doctor-bad-ort.json" >"$W/doctor-bad.txt" 2>&1 || rc=$?
    sed 's/^/    /' "$W/doctor-bad.txt"
    [ "$rc" = 1 ] || die "doctor with onnxruntime 1.21.0 under $cpu exited $rc (expected 1)"
    grep -q 'onnxruntime 1.21.0 dies with SIGILL' "$W/doctor-bad.txt" \
      || die "doctor did not report onnxruntime 1.21.0's SIGILL under $cpu"
    log "$cpu doctor with onnxruntime 1.21.0: the SIGILL reported, exit 1 ($((SECONDS - t)) s)"
  fi
  umount "$SYS/proc/cpuinfo"
done
log "ok: ${CPUS// /, } (wheels: $WHEELS)"
