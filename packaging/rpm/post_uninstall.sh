# ringfenced %postun ($1: 0 = erase, 1 = upgrade). RPM has no purge: erase
# keeps /var/lib/ringfence (agent key, journal) and /etc/ringfence; delete
# them by hand to forget this host's identity.
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || :
fi
