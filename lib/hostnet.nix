# Pure helpers of the host module (modules/host.nix): addresses, MACs and
# proxy ports derived from a VM's name, and the nftables ruleset. Kept
# builtins-and-lib only, so the tests render the ruleset from the same code.
{ lib }:
let
  contract = import ./contract.nix;

  pow2 = n: if n == 0 then 1 else 2 * pow2 (n - 1);

  parseIPv4 =
    text:
    let
      parts = lib.splitString "." text;
      octets = map lib.toInt parts;
    in
    if builtins.length parts != 4 || lib.any (o: o < 0 || o > 255) octets then
      throw "agent-microvm: ${text} is not an IPv4 address"
    else
      lib.foldl (acc: o: acc * 256 + o) 0 octets;

  formatIPv4 =
    n:
    lib.concatMapStringsSep "." toString [
      (n / 16777216)
      (lib.mod (n / 65536) 256)
      (lib.mod (n / 256) 256)
      (lib.mod n 256)
    ];

  hash = name: builtins.hashString "sha256" "agent-microvm:${name}";
in
rec {
  inherit parseIPv4 formatIPv4;

  # The ranges the VMs never reach directly (open mode) and the egress proxy
  # never connects to: netpolicy._NOT_PUBLIC's IPv4 part, compared with it
  # by tests/unit/test_hostnet_seam.py.
  nonPublicIPv4 = [
    "0.0.0.0/8"
    "10.0.0.0/8"
    "100.64.0.0/10"
    "127.0.0.0/8"
    "169.254.0.0/16"
    "172.16.0.0/12"
    "192.0.0.0/24"
    "192.0.2.0/24"
    "192.168.0.0/16"
    "198.18.0.0/15"
    "198.51.100.0/24"
    "203.0.113.0/24"
    "224.0.0.0/3"
  ];

  # The subnet of the bridge: { base; size; } with base the network address.
  subnet =
    { address, prefixLength, ... }:
    let
      size = pow2 (32 - prefixLength);
      addr = parseIPv4 address;
    in
    {
      base = addr - lib.mod addr size;
      inherit size;
    };

  # A VM's host number in the subnet, from its name: 2 .. size-2 (the
  # network address, 1 and the broadcast address are never picked; the
  # bridge's own address is reported as a clash like any other).
  derivedIndex =
    net: name: 2 + lib.mod (lib.fromHexString (builtins.substring 0 7 (hash name))) (net.size - 3);

  derivedAddress = net: name: formatIPv4 (net.base + derivedIndex net name);

  # Locally administered, unicast (02:...), five bytes from the name.
  derivedMac =
    name:
    let
      h = hash name;
      byte = i: builtins.substring (8 + 2 * i) 2 h;
    in
    lib.concatStringsSep ":" ([ "02" ] ++ map byte (lib.range 0 4));

  # The host number of an address inside the subnet, or null outside it.
  indexOf =
    net: address:
    let
      n = parseIPv4 address;
    in
    if n >= net.base && n < net.base + net.size then n - net.base else null;

  # The TCP interface name of a VM's tap (IFNAMSIZ: 15 characters).
  tapName = name: "vm-${name}";

  # The nftables tables (networking.nftables.tables) for the bridge:
  #   bridge: { name; address; prefixLength; externalInterface; }
  #   vms: [ { name; address; mac; tap; mode; proxyPort; keyProxy; } ]
  # Two tables: `inet agent-microvm` (what VMs reach on L3, NAT) and
  # `bridge agent-microvm-l2` (no spoofed addresses, no VM-to-VM frames).
  nftTables =
    { bridge, vms }:
    let
      br = ''"${bridge.name}"'';
      net = subnet bridge;
      cidr = "${formatIPv4 net.base}/${toString bridge.prefixLength}";
      ext = bridge.externalInterface;
      proxied = builtins.filter (vm: vm.mode != "none") vms;
      redirect =
        vm:
        if vm.mode == "allowlist" then
          "iifname ${br} ip saddr ${vm.address} meta l4proto tcp redirect to :${toString vm.proxyPort}"
        else
          # open: only the key proxy port on the gateway goes to the proxy
          # (the runner's port: the guest's base URLs name it).
          "iifname ${br} ip saddr ${vm.address} ip daddr ${bridge.address} tcp dport ${toString contract.network.ports.keyProxy} redirect to :${toString vm.proxyPort}";
      openForward =
        vm:
        lib.optional (vm.mode == "open" && ext != null)
          "iifname ${br} ip saddr ${vm.address} oifname \"${ext}\" ip daddr != @nonpublic4 accept";
      l2 = vm: [
        "iifname \"${vm.tap}\" ether saddr != ${vm.mac} drop"
        "iifname \"${vm.tap}\" ether type ip ip saddr != ${vm.address} drop"
        "iifname \"${vm.tap}\" ether type arp arp saddr ether != ${vm.mac} drop"
        "iifname \"${vm.tap}\" ether type arp arp saddr ip != ${vm.address} drop"
      ];
      block = lines: lib.concatMapStrings (l: "${l}\n") lines;
      chain = name: lines: block ([ "chain ${name} {" ] ++ map (l: "  ${l}") lines ++ [ "}" ]);
    in
    {
      agent-microvm = {
        family = "inet";
        content = block [
          "# Managed by services.agent-microvm (modules/host.nix): what the agent"
          "# VMs on ${bridge.name} reach. Nothing else: not this host, not the LAN."
          "set nonpublic4 {"
          "  type ipv4_addr"
          "  flags interval"
          "  elements = { ${lib.concatStringsSep ", " nonPublicIPv4} }"
          "}"
        ]
        + chain "prerouting" (
          [ "type nat hook prerouting priority dstnat; policy accept;" ] ++ map redirect proxied
        )
        + chain "input" (
          [
            "type filter hook input priority filter; policy accept;"
            "iifname ${br} ct state established,related accept"
          ]
          # The proxy's port on the gateway only: an open VM's connections
          # to this host's other addresses are not redirected.
          ++ map (
            vm:
            "iifname ${br} ip saddr ${vm.address} ip daddr ${bridge.address} tcp dport ${toString vm.proxyPort} accept"
          ) proxied
          ++ [ "iifname ${br} counter drop" ]
        )
        + chain "forward" (
          [
            "type filter hook forward priority filter; policy accept;"
            "oifname ${br} ct state established,related accept"
            "oifname ${br} counter drop"
          ]
          ++ lib.concatMap openForward vms
          ++ [ "iifname ${br} counter drop" ]
        )
        + chain "postrouting" (
          [ "type nat hook postrouting priority srcnat; policy accept;" ]
          ++ lib.optional (ext != null) "ip saddr ${cidr} oifname \"${ext}\" masquerade"
        );
      };
      agent-microvm-l2 = {
        family = "bridge";
        content =
          block [ "# Each tap speaks only with its own MAC and address, IPv4 and ARP." ]
          + chain "prerouting" (
            [ "type filter hook prerouting priority filter; policy accept;" ]
            ++ lib.concatMap l2 vms
            ++ [ "iifname \"vm-*\" ether type != { ip, arp } drop" ]
          )
          + chain "forward" [
            "type filter hook forward priority filter; policy accept;"
            "iifname \"vm-*\" oifname \"vm-*\" drop"
          ];
      };
    };

  # The tables as NixOS writes them into the ruleset (nftables.nix).
  renderTables =
    tables:
    lib.concatStrings (
      lib.mapAttrsToList (name: t: ''
        table ${t.family} ${name}
        delete table ${t.family} ${name}
        table ${t.family} ${name} {
          ${t.content}
        }
      '') tables
    );
}
