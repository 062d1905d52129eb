#!/bin/sh
# Lays out the runtime image's file system under $1 (minus the binary): base/ holds
# /etc/passwd and /etc/group with the non-root user 10001, CA roots and /tmp; state/ the
# state directory, which the Dockerfile copies on its own so that it belongs to 10001.
# Used by the Dockerfile's builder stage and by scripts/image-smoke.sh, so both images
# are the same.
set -eu
out=${1:?usage: rootfs.sh DIR}
root=$out/base
mkdir -p "$root/etc/ssl/certs" "$root/etc/backupy" "$root/tmp" "$out/state/backupy"
echo 'root:x:0:0:root:/root:/sbin/nologin' >"$root/etc/passwd"
echo 'backupy:x:10001:10001:backupy:/var/lib/backupy:/sbin/nologin' >>"$root/etc/passwd"
printf 'root:x:0:\nbackupy:x:10001:\n' >"$root/etc/group"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$root/tmp"
chmod 700 "$out/state/backupy"
