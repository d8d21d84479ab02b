#!/usr/bin/env bash
# Run by `make test` (not by `make up`): the programs the tests drive that PyPI does not carry.
set -euo pipefail

# Tools the tests drive as real programs that PyPI does not carry: tmux (fleetlm status in a real terminal)
# and the Prometheus server (it scrapes a running fleet). Installed with apt when this runs as root on
# Debian/Ubuntu (as CI does); elsewhere the command is printed, and the tests that need them fail naming it.
missing=()
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} with apt-get..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      || echo "make test: apt-get could not install ${missing[*]}; the tests that need them will fail" >&2
  else
    echo "make test: ${missing[*]} not installed; the tests need them. As root on Debian/Ubuntu:" \
      "apt-get install -y ${missing[*]} (elsewhere: your package manager, or https://prometheus.io/download/)" >&2
  fi
fi
