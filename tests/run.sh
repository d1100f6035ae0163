#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine (Python 3.11): installs the
# Debian packages the real-server tests use, the Python test extras, builds the
# eBPF object, then runs ruff and pytest. Servers are started and stopped by the
# tests themselves (loopback, free ports, temporary directories, stopped by PID).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(tcpdump tshark postgresql mariadb-server redis-server mosquitto nginx php-fpm memcached
              clang llvm libbpf-dev bpftool curl gcc prometheus nats-server rabbitmq-server
              libpcap0.8 unbound bind9-dnsutils systemd)
# tests/test_deploy.py renders deploy/kubernetes with kubectl kustomize: Debian's kubectl, unless one
# from elsewhere is installed (its package would conflict with kubernetes-client's /usr/bin/kubectl).
command -v kubectl >/dev/null || APT_PACKAGES+=(kubernetes-client)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # tshark asks whether non-root may capture: answer no, without a prompt.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A failed install must fail the run here, not later as an import error.
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q -e '.[test]'

if [ -f receivers/ebpf/build.sh ]; then
  bash receivers/ebpf/build.sh
fi

python3 -m ruff check .
# The C accelerators must have built here: a silent fallback would hide a slower service.
WIRESPAN_REQUIRE_SPEEDUPS=1 python3 -m pytest -q --durations=25 "$@"
