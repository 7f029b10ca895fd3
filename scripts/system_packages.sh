#!/usr/bin/env bash
# The Debian packages the test suite uses, installed when missing (needs root):
#   chromium       the browser test of the web target (tests/test_web.py)
#   qemu-user >= 8 the emulated CPU classes (tests/test_cpu_classes.py,
#                  scripts/check_cpu_classes.py); bookworm's 7.2 emulates AVX2 wrongly, so
#                  it comes from bookworm-backports there
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

qemu_major() {
    command -v qemu-x86_64 >/dev/null || { echo 0; return; }
    qemu-x86_64 --version | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -n1
}

updated=0
update() {
    ((updated)) || apt-get update -qq
    updated=1
}

if ! command -v chromium >/dev/null; then
    update
    apt-get install -y -qq chromium >/dev/null
fi
if (($(qemu_major) < 8)); then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    target=()
    if [[ $codename == bookworm ]]; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" \
            >/etc/apt/sources.list.d/coatnet-backports.list
        updated=0
        target=(-t bookworm-backports)
    fi
    update
    apt-get install -y -qq "${target[@]}" qemu-user qemu-user-static >/dev/null
fi
echo "system packages: chromium $(chromium --version 2>/dev/null | awk '{print $2}'), qemu $(qemu_major)"
