#!/bin/sh
set -eu
# microvm.nix empties microvm@'s path (path = mkForce [ ]).
PATH=/nix/store/3993c379c029014a9c4b2adf5d23397b-coreutils/bin
dir=/var/lib/microvms/beta
install -d -m 0755 "$dir" "$dir/ssh"
install -d -m 0700 -o 1001 "$dir/home"
if [ ! -e "$dir/ssh/ssh_host_ed25519_key" ]; then
  /nix/store/fccc979cdc29g8005d55g912gcdg5d25-openssh/bin/ssh-keygen -q -t ed25519 -N "" -C "agent-microvm beta" \
    -f "$dir/ssh/ssh_host_ed25519_key"
fi
chmod 0644 "$dir/ssh/ssh_host_ed25519_key.pub"
printf '%s %s\n' 10.77.0.37 "$(cut -d' ' -f1,2 "$dir/ssh/ssh_host_ed25519_key.pub")" \
  > "$dir/ssh/known_hosts"
chmod 0644 "$dir/ssh/known_hosts"
