#!/usr/bin/env bash
# Side-by-side benchmark: smtp-source -> smtp-sink directly, through project-relay, and through
# a throwaway Postfix relay; plus latency, idle-connection and large-message modes.
# Loopback only; every process it starts is stopped at the end. Usage:
#   bench/run.sh            # everything, writes bench/RESULTS.md
#   bench/run.sh --quick    # fewer messages, for a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."

need_install=()
command -v smtp-source >/dev/null && command -v smtp-sink >/dev/null || need_install+=(postfix)
command -v python3 >/dev/null || need_install+=(python3)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "installing ${need_install[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  # Postfix's own setup would configure it as the system MTA; we only want its binaries.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq "${need_install[@]}" >/dev/null
fi

cargo build --release --locked
# 10,000 idle connections need file descriptors on both ends.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/bench.py "$@"
