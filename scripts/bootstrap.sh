#!/usr/bin/env bash
# Install the system packages a job needs on a fresh Debian/Ubuntu machine, or stop at once naming them.
#
#   scripts/bootstrap.sh run    what `make run` needs (a C++ compiler for optimum-quanto's kernels, and
#                               Mosquitto: the demo runs a real broker)
#   scripts/bootstrap.sh test   what `make test` needs as well (Chromium for the web-page tests, Mosquitto
#                               and its clients for the fleet tests, which run a real broker, the
#                               PostgreSQL server, which the store tests run a throwaway cluster of, and
#                               iproute2 for the network-partition test's namespace)
#
# Called by the Makefile and by CI alike. As root it installs what is missing with apt-get; as anyone
# else it prints one line with the command to run and exits 1. Nothing is downloaded outside the
# distribution's package manager.
set -euo pipefail

job=${1:-run}
# command -> Debian package that provides it
declare -A provides=(
  [python3]=python3 [g++]=g++ [make]=make [chromium]=chromium
  [mosquitto]=mosquitto [mosquitto_pub]=mosquitto-clients [ip]=iproute2
)
case "$job" in
  run) wanted=(python3 g++ make mosquitto) ;;
  test) wanted=(python3 g++ make chromium mosquitto mosquitto_pub ip) ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

missing=()
for cmd in "${wanted[@]}"; do
  # sbin too: Debian puts mosquitto in /usr/sbin, which is not on a normal user's PATH.
  PATH="$PATH:/usr/sbin:/usr/local/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${provides[$cmd]}")
done
# The PostgreSQL server is not a command on PATH: Debian keeps initdb, pg_ctl and postgres per version
# under /usr/lib/postgresql/<ver>/bin, which is where fleet/postgres.py looks too.
have_postgresql() {
  local bin
  for bin in /usr/lib/postgresql/*/bin; do
    [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && [ -x "$bin/postgres" ] && return 0
  done
  return 1
}
if [ "$job" = test ] && ! have_postgresql; then
  missing+=(postgresql)
fi
# venv is a separate package on Debian's python3.
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "zimage-edge: missing system packages: ${missing[*]} (install them, e.g. sudo apt-get install -y ${missing[*]})" >&2
  exit 1
fi
echo "zimage-edge: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
