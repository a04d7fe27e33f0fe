# ringfenced %post ($1: 1 = install, 2 = upgrade)
install -d -m 0700 -o root -g root /var/lib/ringfence
install -d -m 0755 -o root -g root /etc/ringfence/tls
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    # Enable on install; starting is a no-op until /etc/ringfence/tls/host.pem
    # exists (ConditionPathExists in the unit).
    systemctl --no-reload enable ringfenced.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl start ringfenced.service >/dev/null 2>&1 || :
    fi
elif [ -d /run/systemd/system ]; then
    # Upgrade. Inside the unit (a patch profile upgrading the agent itself) a
    # restart would kill rpm half way; the agent exits 75 after the profile
    # and systemd restarts it (RestartForceExitStatus=75) instead.
    if ! grep -q '/ringfenced\.service$' /proc/self/cgroup 2>/dev/null; then
        systemctl try-restart ringfenced.service >/dev/null 2>&1 || :
    fi
fi
