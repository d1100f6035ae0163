#!/usr/bin/env bash
# Build the CO-RE eBPF object from bpf/wirespan.bpf.c.
# Needs clang, libbpf-dev (bpf/*.h) and bpftool (vmlinux.h from the running
# kernel's BTF). The built object is committed too, so users without clang can
# run the receiver: when the tools are missing this script keeps the shipped
# object and says so, instead of failing.
set -euo pipefail
cd "$(dirname "$0")/bpf"

BTF=/sys/kernel/btf/vmlinux
if ! command -v clang >/dev/null || ! command -v bpftool >/dev/null || [ ! -r "$BTF" ] \
   || [ ! -f /usr/include/bpf/bpf_helpers.h ]; then
  if [ -f wirespan.bpf.o ]; then
    echo "receivers/ebpf/build.sh: clang, bpftool, libbpf-dev or $BTF missing; keeping the shipped wirespan.bpf.o" >&2
    exit 0
  fi
  echo "receivers/ebpf/build.sh: need clang, bpftool, libbpf-dev and $BTF to build wirespan.bpf.o" >&2
  exit 1
fi

if [ ! -s vmlinux.h ]; then
  bpftool btf dump file "$BTF" format c > vmlinux.h.tmp
  mv vmlinux.h.tmp vmlinux.h
fi

ARCH=$(uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
clang -O2 -g -target bpf -D__TARGET_ARCH_"$ARCH" -Wall -Werror \
  -I. -c wirespan.bpf.c -o wirespan.bpf.o.tmp
# Drop DWARF (BTF is kept): a smaller object to ship, identical behaviour.
llvm-strip -g wirespan.bpf.o.tmp 2>/dev/null || true
mv wirespan.bpf.o.tmp wirespan.bpf.o
