#!/usr/bin/env bash
# LiteLLM's proxy, the peer bench/gateway.py measures the gateway against, in a virtualenv of its
# own (.bench/litellm-venv, or $STEWARD_BENCH_LITELLM): outside Steward's locked dependencies,
# never imported by Steward, only run as a process. Does nothing when it is already there.
#
# Virtual keys (the fair comparison: Steward checks a key on every call) need LiteLLM's database,
# so Prisma's generated client and its engines. Prisma downloads the engines from its own CDN, not
# from a package registry: where that cannot be reached, `prisma generate` fails, this script says
# so, and the bench authenticates with LiteLLM's master key instead (and prints that it did).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${STEWARD_BENCH_LITELLM:-.bench/litellm-venv}

if [ ! -x "$VENV/bin/litellm" ]; then
  echo "installing LiteLLM's proxy into $VENV (a minute)…"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'litellm[proxy]' prisma
fi

# Marks: .prisma-ready (virtual keys work), .prisma-failed (tried; delete it to try again).
if [ ! -e "$VENV/.prisma-ready" ] && [ ! -e "$VENV/.prisma-failed" ]; then
  schema=$(echo "$VENV"/lib/python3*/site-packages/litellm/proxy/schema.prisma)
  if "$VENV/bin/prisma" generate --schema "$schema" >"$VENV/prisma-generate.log" 2>&1; then
    touch "$VENV/.prisma-ready"
  else
    touch "$VENV/.prisma-failed"
    echo "LiteLLM: no virtual keys here (prisma generate failed, see $VENV/prisma-generate.log:" \
      "$(grep -m1 -i error "$VENV/prisma-generate.log" || tail -n1 "$VENV/prisma-generate.log"));" \
      "the bench uses its master key"
  fi
fi
echo "LiteLLM $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("litellm"))') in $VENV" \
  "($([ -e "$VENV/.prisma-ready" ] && echo "virtual keys: yes" || echo "virtual keys: no, master key only"))"
