# Shared set-up for .ci/test and .ci/demo (sourced, not run). Idempotent: a second run installs nothing.
#   - system packages: orthanc, orthanc-dicomweb, dcmtk, chromium + chromium-driver (apt, only when missing)
#   - PostgreSQL: started when installed but not running (tests use 127.0.0.1:5432, db "test")
#   - .venv with torch first (the wheel pip finds on this machine), then the project with [worker,dev]
# Set RADCOHORT_SKIP_APT=1 / RADCOHORT_SKIP_PG=1 to leave the system alone.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[radcohort setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else log "need root (or sudo) for: $*"; return 1
  fi
}

# ---- system packages ---------------------------------------------------------------------------
apt_missing=()
{ command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } || apt_missing+=(orthanc)
ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1 || apt_missing+=(orthanc-dicomweb)
command -v storescu >/dev/null 2>&1 || apt_missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || apt_missing+=(dicom3tools)
# the openssl CLI makes the TLS tests' certificates (tests/hardening/test_tls.py; CI=true fails on a skip)
command -v openssl >/dev/null 2>&1 || apt_missing+=(openssl)
# the web console's browser test (tests/web/test_browser.py): Debian's headless Chromium and its chromedriver
command -v chromium >/dev/null 2>&1 || apt_missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || apt_missing+=(chromium-driver)
if ! command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  apt_missing+=(postgresql)
fi
if [ "${#apt_missing[@]}" -gt 0 ] && [ "${RADCOHORT_SKIP_APT:-0}" != 1 ]; then
  log "installing system packages: ${apt_missing[*]}"
  # keep apt from starting the packaged Orthanc service (our tests and demo start their own on free ports)
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null && as_root chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
  [ "$made_policy" = 1 ] && as_root rm -f /usr/sbin/policy-rc.d
fi

# ---- PostgreSQL --------------------------------------------------------------------------------
if [ "${RADCOHORT_SKIP_PG:-0}" != 1 ] && command -v pg_ctlcluster >/dev/null 2>&1 \
   && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  for ver in $(ls /etc/postgresql 2>/dev/null); do
    hba="/etc/postgresql/$ver/main/pg_hba.conf"
    # a cluster we just installed asks for passwords on TCP: the tests connect as postgres@127.0.0.1 (trust)
    if [ -f "$hba" ] && ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
      log "PostgreSQL $ver: trust auth for local TCP (test machine)"
      as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    log "starting PostgreSQL $ver"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  done
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if [ "${RADCOHORT_SKIP_PG:-0}" != 1 ] && command -v psql >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if ! psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" postgres 2>/dev/null | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -c 'CREATE DATABASE test' postgres >/dev/null 2>&1 || log "could not create database test"
  fi
fi

# ---- Python virtual environment ----------------------------------------------------------------
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { log "Python 3.11+ required ($PY is $("$PY" -V))"; exit 1; }
  log "creating .venv with $("$PY" -V)"
  "$PY" -m venv .venv
fi
stamp=.venv/.radcohort-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  piplog=.venv/pip-install.log
  pip_q() {  # quiet unless it fails: then show the end of pip's output
    .venv/bin/python -m pip install -q "$@" >>"$piplog" 2>&1 || { tail -40 "$piplog" >&2; log "pip install $* failed (full log: $piplog)"; return 1; }
  }
  if ! .venv/bin/python -c 'import torch, torchvision' >/dev/null 2>&1; then
    # first, so that the project's torch range is already met (pip takes this pair from the local disk)
    log "installing torch and torchvision (a few minutes the first time)"
    pip_q torch==2.14.1 torchvision==0.29.1
  fi
  log "installing radcohort[worker,dev]"
  pip_q -e '.[worker,dev]'
  echo "$want" > "$stamp"
fi
# appended, not prepended: pynetdicom installs its own storescu/findscu/... into .venv/bin, and the
# tests and users mean dcmtk's
export PATH="$PATH:$ROOT/.venv/bin"
