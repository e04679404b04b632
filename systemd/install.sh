#!/usr/bin/env bash
# Installs scout as a systemd service on this machine (run as root from the repository,
# after `cargo build --release` or with BIN=path/to/scout, e.g. a cross-built aarch64 one):
#   /opt/scout/bin/scout, /opt/scout/models/, /etc/scout/scout.toml (kept if present),
#   /etc/systemd/system/scout.service; then enables and starts the service.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/scout}
[ -x "$BIN" ] || { echo "no binary at $BIN: cargo build --release first" >&2; exit 1; }

install -D -m 0755 "$BIN" /opt/scout/bin/scout
mkdir -p /opt/scout/models/adapters
install -m 0644 models/models.toml models/*.onnx models/LICENSE-* /opt/scout/models/
install -m 0644 models/adapters/* /opt/scout/models/adapters/
install -m 0644 README.md /opt/scout/README.md
if [ ! -e /etc/scout/scout.toml ]; then
  install -d -m 0755 /etc/scout
  # The embedded defaults, with the state directory systemd gives the service.
  /opt/scout/bin/scout default-config \
    | sed 's#^data_dir = "scout-data"#data_dir = "/var/lib/scout"#' >/etc/scout/scout.toml
  chmod 0644 /etc/scout/scout.toml
  echo "wrote /etc/scout/scout.toml: set destinations and AE titles there"
fi
/opt/scout/bin/scout check-config /etc/scout/scout.toml
install -m 0644 systemd/scout.service /etc/systemd/system/scout.service
systemctl daemon-reload
systemctl enable --now scout.service
systemctl --no-pager status scout.service || true
