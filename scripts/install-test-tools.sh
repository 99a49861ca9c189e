#!/usr/bin/env bash
# Installs the few system tools the test suite drives as real clients (curl, openssl, dig,
# chromium for the console's browser tests),
# when they are missing. Runs as root from Debian's packages; does nothing if all are present.
set -euo pipefail
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing test tools: ${need[*]} (install them; tests that need them will fail)" >&2
  exit 0
fi
echo "installing ${need[*]}"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
