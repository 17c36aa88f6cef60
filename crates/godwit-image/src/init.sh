#!/bin/busybox sh
# godwit test guest init (PID 1). Generated into the initramfs by
# godwit-image; any change here changes the image cache key.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
# Modules in dependency order (resolved from .modinfo at build time).
for m in $(cat /etc/godwit/modules); do
    insmod "/lib/modules/$m.ko" || echo "godwit-init: insmod $m failed"
done
hostname godwit-guest
ip link set lo up
# Network from the kernel command line: godwit.ip=ADDR/PREFIX godwit.gw=GW
addr=""
gw=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        godwit.ip=*) addr="${arg#godwit.ip=}" ;;
        godwit.gw=*) gw="${arg#godwit.gw=}" ;;
    esac
done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    [ -n "$addr" ] && ip addr add "$addr" dev eth0
    [ -n "$gw" ] && ip route add default via "$gw"
fi
echo "godwit-init: up in $(cut -d' ' -f1 /proc/uptime)s"
# The instrument must always be there: respawn it if it ever exits.
while true; do
    /bin/godwit-guest serve
    echo "godwit-init: godwit-guest exited with $?, restarting"
    sleep 1
done
