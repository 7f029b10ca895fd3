#!/usr/bin/env bash
# Prove an export on aarch64: run scripts/infer.py under qemu user-mode emulation in an arm64
# Debian root and compare its predictions with the same script on this x86 host.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/check_arm64.sh [options] EXPORT_DIR IMAGE_OR_FOLDER...
       scripts/check_arm64.sh [options] --build-only

Runs scripts/infer.py --json on x86 (the repo's venv) and on arm64 (Debian bookworm under
qemu-aarch64, with the arm64 wheels of the x86 venv's onnxruntime, numpy and Pillow versions)
for every model the export holds among:
  model.onnx            fp32          pass: same top-1 on every image, and for the x86 top-5
                                      classes of every image |p_arm - p_x86| / p_x86 <= RTOL
  model.int8.onnx       int8          pass: same top-1 on every image
  model.e2e.onnx        e2e fp32      pass: same top-1 on every image
  model.e2e.int8.onnx   e2e int8      pass: same top-1 on every image
A model the export lacks is skipped with a message. infer.py is asked for every class
(--top-k 1000000), so "max |dp|" in the table is the largest probability difference over all
classes of all images. Exit 0: every model present passed; 1: a failure; 2: bad usage.
Emulated run times are not performance figures; this script reports none.

Making the models (the int8 one quantized with the arm64 preset):
  coatnet-export export ... --output EXPORT_DIR
  coatnet-export quantize EXPORT_DIR --calibration-data IMAGES --target-cpu arm64-dotprod
      (before --target-cpu exists, the same choice by hand:
       --activation-type uint8 --weight-type int8 --no-reduce-range)
  coatnet-export package EXPORT_DIR --target e2e      # model.e2e.onnx, model.e2e.int8.onnx

Options:
  --cache DIR     where the arm64 root and wheels live   [$COATNET_ARM64_CACHE or
                  /var/cache/coatnet-arm64]; built on first use (a few minutes, ~450 MB)
  --cpu MODEL     qemu CPU model [$COATNET_ARM64_CPU or cortex-a76: ARMv8.2 with dot product,
                  the Raspberry Pi 5 core]; cortex-a72 (Raspberry Pi 4, no dot product),
                  neoverse-n1 (Graviton2), max (every feature qemu has, SVE and i8mm too)
  --python PATH   x86 Python with onnxruntime, numpy, Pillow [the repo's .venv/bin/python]
  --rtol X        fp32 relative tolerance on the top-5 probabilities [1e-4]
  --threads N     onnxruntime threads on both sides [1]
  --mirror URL    Debian mirror [http://deb.debian.org/debian]
  --no-binfmt     build the root without binfmt_misc even where it works (the path taken
                  automatically where binfmt_misc cannot be mounted, e.g. in a container)
  --build-only    build or refresh the root, check its imports, and stop
Needs root (debootstrap, chroot) and, once, the network (Debian mirror and PyPI).
EOF
}

die() {
    echo "error: $*" >&2
    exit 2
}
say() { echo "[arm64] $*" >&2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${COATNET_ARM64_CACHE:-/var/cache/coatnet-arm64}
CPU=${COATNET_ARM64_CPU:-cortex-a76}
PY=$REPO/.venv/bin/python
RTOL=1e-4
THREADS=1
MIRROR=http://deb.debian.org/debian
USE_BINFMT=auto
BUILD_ONLY=0
MODELS=(model.onnx:fp32 model.int8.onnx:int8 model.e2e.onnx:e2e model.e2e.int8.onnx:e2e-int8)

parse_args() {
    POSITIONAL=()
    while (($#)); do
        case $1 in
            -h | --help) usage; exit 0 ;;
            --cache) CACHE=${2:?--cache needs a directory}; shift ;;
            --cpu) CPU=${2:?--cpu needs a qemu CPU model}; shift ;;
            --python) PY=${2:?--python needs a path}; shift ;;
            --rtol) RTOL=${2:?--rtol needs a number}; shift ;;
            --threads) THREADS=${2:?--threads needs a number}; shift ;;
            --mirror) MIRROR=${2:?--mirror needs a URL}; shift ;;
            --no-binfmt) USE_BINFMT=no ;;
            --build-only) BUILD_ONLY=1 ;;
            -*) die "unknown option $1 (see --help)" ;;
            *) POSITIONAL+=("$1") ;;
        esac
        shift
    done
    [[ $EUID -eq 0 ]] || die "needs root for debootstrap and chroot (run it with sudo)"
    [[ -x $PY ]] || die "no Python at $PY (make the venv, or give --python)"
    [[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"
    if ((!BUILD_ONLY)); then
        ((${#POSITIONAL[@]} >= 2)) || die "give an export directory and images (see --help)"
        EXPORT=${POSITIONAL[0]}
        IMAGES=("${POSITIONAL[@]:1}")
        [[ -d $EXPORT ]] || die "export directory $EXPORT not found"
        local entry found=0
        for entry in "${MODELS[@]}"; do
            [[ -f $EXPORT/${entry%%:*} ]] && found=1
        done
        ((found)) || die "$EXPORT holds none of ${MODELS[*]%%:*} (export a model first)"
        local image
        for image in "${IMAGES[@]}"; do
            [[ -e $image ]] || die "image or folder $image not found"
        done
    fi
    ROOT=$CACHE/root
}

# --- the host: qemu, debootstrap, binfmt_misc -------------------------------------------------
ensure_host_tools() {
    if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
        say "installing qemu-user-static, debootstrap and binfmt-support (Debian packages)"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            qemu-user-static debootstrap binfmt-support >&2
    fi
}

# True when the kernel runs arm64 ELF files through qemu (needed to run debootstrap's
# second stage, which executes dpkg and maintainer scripts inside the root).
binfmt_works() {
    [[ $USE_BINFMT == no ]] && return 1
    local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
    if [[ ! -e $entry ]]; then
        mountpoint -q /proc/sys/fs/binfmt_misc ||
            mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || return 1
        command -v update-binfmts >/dev/null && update-binfmts --enable qemu-aarch64 2>/dev/null
    fi
    [[ -e $entry ]] && [[ $(head -n1 "$entry") == enabled ]]
}

# --- the arm64 root ------------------------------------------------------------------------
bootstrap_root() {
    local tmp=$CACHE/root.tmp start=$SECONDS
    rm -rf "$tmp"
    if binfmt_works; then
        say "debootstrap arm64 bookworm (binfmt_misc: full bootstrap under qemu)"
        debootstrap --arch=arm64 --variant=minbase --include=python3 bookworm "$tmp" "$MIRROR" \
            >"$CACHE/debootstrap.log" 2>&1 || die "debootstrap failed: see $CACHE/debootstrap.log"
    else
        say "debootstrap --foreign arm64 bookworm (no binfmt_misc: packages unpacked, not configured)"
        debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm "$tmp" \
            "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
            die "debootstrap failed: see $CACHE/debootstrap.log"
        unpack_foreign "$tmp"
    fi
    rm -f "$tmp"/var/cache/apt/archives/*.deb
    mv "$tmp" "$ROOT"
    say "root ready in $((SECONDS - start)) s: $ROOT ($(du -sh "$ROOT" | cut -f1))"
}

# Without binfmt_misc the second stage cannot run; unpacking every downloaded package is
# enough for python3 (its files, symlinks included, are all in the package data).
unpack_foreign() {
    local root=$1 path
    while read -r _ path; do
        dpkg-deb --fsys-tarfile "$root$path" | tar -x -C "$root" --keep-directory-symlink
    done <"$root/debootstrap/debpaths"
}

# The wheels: the x86 venv's own versions of onnxruntime, numpy, Pillow and onnxruntime's
# unconditional dependencies, so that both sides run the same code.
wanted_requirements() {
    "$PY" - <<'PY'
from importlib.metadata import requires, version

from packaging.requirements import Requirement

names = ["onnxruntime", "numpy", "pillow"]
for line in requires("onnxruntime") or []:
    requirement = Requirement(line)
    if requirement.marker is None and requirement.name.lower() not in names:
        names.append(requirement.name.lower())
print(" ".join(f"{name}=={version(name)}" for name in names))
PY
}

install_wheels() {
    local wanted stamp=$ROOT/opt/site/.requirements
    wanted=$(wanted_requirements)
    [[ -f $stamp && $(cat "$stamp") == "$wanted" ]] && return 0
    say "arm64 wheels: $wanted"
    local platform=(--only-binary=:all: --platform manylinux2014_aarch64
        --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311)
    # shellcheck disable=SC2086  # $wanted is a list of requirements
    "$PY" -m pip download -q --no-deps "${platform[@]}" -d "$CACHE/wheels" $wanted >&2
    rm -rf "$ROOT/opt/site.tmp"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --find-links "$CACHE/wheels" --no-deps "${platform[@]}" \
        --target "$ROOT/opt/site.tmp" $wanted >&2
    echo "$wanted" >"$ROOT/opt/site.tmp/.requirements"
    rm -rf "$ROOT/opt/site"
    mv "$ROOT/opt/site.tmp" "$ROOT/opt/site"
}

ensure_root() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    [[ -x $ROOT/usr/bin/python3 ]] || bootstrap_root
    cmp -s /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/qemu-aarch64-static" ||
        cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/qemu-aarch64-static"
    install_wheels
    flock -u 9
}

# Run an arm64 command in the root: qemu is named explicitly (so no binfmt_misc is needed
# to run, and the CPU model is ours), from the root's "/" (chroot's working directory).
arm64() {
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONPATH=/opt/site LANG=C.UTF-8 \
        chroot "$ROOT" /usr/bin/qemu-aarch64-static -cpu "$CPU" "$@"
}

check_imports() {
    local x86 arm
    x86=$("$PY" -c 'import numpy, onnxruntime, PIL; print(onnxruntime.__version__, numpy.__version__, PIL.__version__)')
    arm=$(arm64 /usr/bin/python3 -c 'import platform, sys, numpy, onnxruntime, PIL
print(onnxruntime.__version__, numpy.__version__, PIL.__version__, platform.machine(),
      sys.version.split()[0])' 2>/dev/null) || die "the arm64 root cannot import onnxruntime, numpy, PIL"
    say "x86:   onnxruntime numpy Pillow = $x86 (host CPU: $(lscpu | sed -n 's/^Model name: *//p'))"
    say "arm64: onnxruntime numpy Pillow = ${arm% * *}; machine ${arm#* * * }; qemu -cpu $CPU"
    [[ ${arm% * *} == "$x86" ]] || die "arm64 and x86 versions differ ($arm vs $x86)"
    [[ $arm == *" aarch64 "* ]] || die "the root's python does not report aarch64 ($arm)"
}

# --- the comparison ----------------------------------------------------------------------------
# A staging folder inside the root holds infer.py, the export and the images; both sides run
# from the root's top with the same relative paths, so their JSON names the same images.
stage() {
    RUN=$(mktemp -d "$ROOT/tmp/check.XXXXXX")
    trap 'rm -rf "$RUN"' EXIT
    REL=${RUN#"$ROOT"/}
    cp "$REPO/scripts/infer.py" "$RUN/infer.py"
    cp -rl "$EXPORT/." "$RUN/export" 2>/dev/null || cp -r "$EXPORT/." "$RUN/export"
    local i=0 image
    for image in "${IMAGES[@]}"; do
        mkdir -p "$RUN/images/$i"
        cp -r "$image" "$RUN/images/$i/"
        i=$((i + 1))
    done
}

# infer.py on one side; its stderr is kept, less onnxruntime's complaints that qemu's
# /proc and /sys do not describe an ARM CPU (it then reads the features from the auxv).
infer() {
    local side=$1 model=$2 out=$3
    local args=("$REL/infer.py" "$REL/export/$model" "$REL/images" --json --top-k 1000000
        --threads "$THREADS")
    local status=0
    if [[ $side == x86 ]]; then
        (cd "$ROOT" && "$PY" "${args[@]}") >"$out.jsonl" 2>"$out.err" || status=$?
    else
        arm64 /usr/bin/python3 "${args[@]}" >"$out.jsonl" 2>"$out.err" || status=$?
    fi
    grep -v -e '^Error in cpuinfo' -e 'cpuid_info warning' -e 'cpuinfo_initialize failed' \
        "$out.err" >"$out.log" || true
    return "$status"
}

run_models() {
    ROWS=$RUN/rows.tsv
    : >"$ROWS"
    local entry model kind
    for entry in "${MODELS[@]}"; do
        model=${entry%%:*} kind=${entry#*:}
        if [[ ! -f $RUN/export/$model ]]; then
            say "skip $model: not in $EXPORT"
            printf '%s\t%s\tskip\t\t\tnot in the export\n' "$model" "$kind" >>"$ROWS"
            continue
        fi
        say "$model: x86"
        if ! infer x86 "$model" "$RUN/$model.x86"; then
            printf '%s\t%s\terror\t\t\tx86 infer.py: %s\n' "$model" "$kind" \
                "$(tail -n1 "$RUN/$model.x86.log")" >>"$ROWS"
            continue
        fi
        say "$model: arm64 under qemu ($CPU)"
        if ! infer arm64 "$model" "$RUN/$model.arm64"; then
            printf '%s\t%s\terror\t\t\tarm64 infer.py: %s\n' "$model" "$kind" \
                "$(tail -n1 "$RUN/$model.arm64.log")" >>"$ROWS"
            continue
        fi
        printf '%s\t%s\tran\t%s\t%s\t\n' "$model" "$kind" "$RUN/$model.x86.jsonl" \
            "$RUN/$model.arm64.jsonl" >>"$ROWS"
    done
}

compare() {
    "$PY" - "$ROWS" "$RTOL" "$CPU" <<'PY'
"""Compare infer.py --json output of x86 and arm64; print a table; exit 1 on a failure."""

import json
import sys


def load(path):
    """{image: {class index: probability}} from infer.py --json lines."""
    rows = (json.loads(line) for line in open(path, encoding="utf-8") if line.strip())
    return {r["image"]: {e["index"]: e["probability"] for e in r["top_k"]} for r in rows}


def measure(kind, x86, arm, rtol):
    """Table cells (images, max |dp| over all classes, max top-5 relative error, top-1
    agreement, result) and the reason for a failure."""
    if set(x86) != set(arm):
        return [str(len(x86)), "-", "-", "-", "FAIL"], "the two sides read different images"
    max_abs = max_rel = 0.0
    same = 0
    for image, p in x86.items():
        q = arm[image]
        max_abs = max(max_abs, max(abs(p[i] - q.get(i, 0.0)) for i in p))
        top5 = sorted(p, key=p.get, reverse=True)[:5]
        max_rel = max(max_rel, max(abs(q[i] - p[i]) / p[i] for i in top5 if p[i] > 0))
        same += max(p, key=p.get) == max(q, key=q.get)
    reasons = []
    if same < len(x86):
        reasons.append(f"top-1 differs on {len(x86) - same} image(s)")
    if kind == "fp32" and max_rel > rtol:
        reasons.append(f"top-5 relative error {max_rel:.2e} > {rtol:g}")
    cells = [str(len(x86)), f"{max_abs:.2e}", f"{max_rel:.2e}", f"{same}/{len(x86)}"]
    return [*cells, "FAIL" if reasons else "pass"], "; ".join(reasons)


def main():
    rows_path, rtol, cpu = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    header = ["model", "kind", "images", "max |dp|", "top-5 max rel", "top-1 same", "result"]
    table, notes = [header], []
    for line in open(rows_path, encoding="utf-8"):
        model, kind, status, x86, arm, message = line.rstrip("\n").split("\t")
        if status == "ran":
            cells, reason = measure(kind, load(x86), load(arm), rtol)
        else:
            cells = ["-", "-", "-", "-", "skipped" if status == "skip" else "FAIL"]
            reason = message
        table.append([model, kind, *cells])
        if reason:
            notes.append(f"{model}: {reason}")
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"x86 host vs arm64 (qemu-aarch64 -cpu {cpu}); probabilities from infer.py --json")
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * width for width in widths))
    print(f"pass: fp32 top-1 same on every image and top-5 relative error <= {rtol:g}; "
          "int8 and e2e top-1 same on every image")
    for note in notes:
        print(note)
    return 1 if any(row[-1] == "FAIL" for row in table[1:]) else 0


sys.exit(main())
PY
}

main() {
    parse_args "$@"
    ensure_host_tools
    ensure_root
    check_imports
    ((BUILD_ONLY)) && return 0
    stage
    run_models
    compare
}

main "$@"
