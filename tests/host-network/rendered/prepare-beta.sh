#!/bin/sh
set -eu
# microvm.nix empties microvm@'s path (path = mkForce [ ]).
PATH=/nix/store/3993c379c029014a9c4b2adf5d23397b-coreutils/bin:/nix/store/5b0440b2a1cgb2db43g1832c91f96728-findutils/bin
fail() {
  echo "agent-microvm: $1; not starting beta" >&2
  exit 1
}
enter() {
  seen=$(stat -c %F:%d:%i -- "$1") || fail "no $1 in $(pwd -P)"
  cd -P -- "$1" || fail "cannot enter $1"
  [ "$seen" = "directory:$(stat -c %d:%i .)" ] || fail "$1 is not a directory (a symlink?)"
}
cd -P -- /var/lib/microvms
enter beta
[ -e ssh ] || [ -L ssh ] || mkdir -m 0755 ssh
[ -e home ] || [ -L home ] || mkdir -m 0700 home
(
  enter home
  chown 1001 .
  chmod 0700 .
)
(
  enter ssh
  chown 0:0 .
  chmod 0755 .
  find . -mindepth 1 -maxdepth 1 \( ! -type f -o ! -user 0 -o -links +1 \) -exec rm -rf -- {} +
  if [ ! -e ssh_host_ed25519_key ] || [ ! -e ssh_host_ed25519_key.pub ]; then
    rm -f ssh_host_ed25519_key ssh_host_ed25519_key.pub
    /nix/store/fccc979cdc29g8005d55g912gcdg5d25-openssh/bin/ssh-keygen -q -t ed25519 -N "" -C "agent-microvm beta" \
      -f ./ssh_host_ed25519_key
  fi
  chmod 0600 ssh_host_ed25519_key
  chmod 0644 ssh_host_ed25519_key.pub
  printf '%s %s\n' 10.77.0.37 "$(cut -d' ' -f1,2 ssh_host_ed25519_key.pub)" >known_hosts
  chmod 0644 known_hosts
)
