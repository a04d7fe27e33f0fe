#!/bin/bash
# Stand-in main process for ringfenced.service in the container tests: it
# speaks the agent's systemd protocol (READY, STATUS, WATCHDOG, SIGHUP) so
# the packaged unit's behaviour can be checked before/without the agent.
# If /etc/ringfence/probe-patch names a .deb, it installs it with dpkg, as a
# patch profile upgrading ringfenced would, from inside the unit's sandbox.
set -u
trap 'touch /var/lib/ringfence/probe-hup' HUP
systemd-notify --ready --status="probe serving"
if [ -f /etc/ringfence/probe-patch ]; then
    deb=$(cat /etc/ringfence/probe-patch)
    rm -f /etc/ringfence/probe-patch
    dpkg -i "$deb" >/var/lib/ringfence/probe-patch.log 2>&1
    echo $? >/var/lib/ringfence/probe-patch.rc
fi
while true; do
    systemd-notify WATCHDOG=1
    sleep 1 &
    wait $!
done
