#!/usr/bin/env bash
# The test command: installs the real DICOM peers the tests talk to (Debian's dcmtk and
# dicom3tools) when they are missing, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${missing[*]} (apt)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo test "$@"
