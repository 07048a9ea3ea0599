#!/usr/bin/env bash
# Install what mone needs on a Debian machine (idempotent): the GStreamer runtime and
# development packages and pkg-config, and mosquitto and nats-server (the sink and cluster
# tests start them). Safe to run again; does nothing when all is present.
set -euo pipefail

PKGS=(pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base
      gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
      gstreamer1.0-tools libgstrtspserver-1.0-dev gstreamer1.0-rtsp fonts-dejavu-core
      mosquitto nats-server)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
APT=($SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q)

echo "setup: installing ${missing[*]}" >&2
"${APT[@]}" update >/dev/null
# The first install can fail on a fresh image (a forced systemd upgrade whose .debs an apt
# clean hook deletes between dpkg runs): repair and try again.
if ! "${APT[@]}" install --no-install-recommends "${missing[@]}" >/tmp/mone-setup.log 2>&1; then
  echo "setup: first install failed, repairing and retrying" >&2
  "${APT[@]}" -f install >>/tmp/mone-setup.log 2>&1 || true
  "${APT[@]}" install --no-install-recommends "${missing[@]}" >>/tmp/mone-setup.log 2>&1 || {
    tail -30 /tmp/mone-setup.log >&2
    exit 1
  }
fi
