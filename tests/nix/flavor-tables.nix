# The docs' flavor tables as lib/flavors.nix makes them (builtins only), and
# a reader for the first column of a Markdown table, so tests/nix/cases.nix
# can fail when a doc lists the flavors by hand and misses one.
#
#   rendered.keyProxy   README's key proxy table (header, rows)
#   rendered.agents     docs/nix.md's agent table
#   firstColumn TEXT HEADER -> the names in the first column of the table
#                              whose header line is HEADER
let
  inherit (builtins)
    attrNames
    concatStringsSep
    elemAt
    filter
    foldl'
    isString
    length
    map
    match
    split
    ;
  flavors = import ../../lib/flavors.nix;
  names = attrNames flavors;

  code = s: "`${s}`";
  # A command as a shell would take it: plain words bare, others quoted.
  word = w: if match "[A-Za-z0-9_./=-]+" w != null then w else "'${w}'";
  lines = rows: concatStringsSep "\n" rows + "\n";

  keyProxyRow =
    name: r:
    let
      header = if r.header == "authorization" then "Authorization: Bearer" else r.header;
      path = r.baseUrlPath or "";
    in
    "| ${name} | ${code r.var} | ${code r.baseUrlVar}${
      if path == "" then "" else " (${code "...${path}"})"
    } | ${code r.upstream}, ${code header} | ${concatStringsSep ", " r.methods} under ${
      concatStringsSep ", " (map code r.paths)
    } |";

  agentRow =
    name:
    let
      f = flavors.${name};
    in
    "| ${name} | ${code f.package}${
      if f.unfree or false then " (unfree, allowed by name)" else ""
    } | ${code (concatStringsSep " " (map word f.command))} | ${
      concatStringsSep ", " (map code f.keyVars)
    } | ${code "~/${f.configDir}"} |";

  # The lines of TEXT, then the first cell of each row of the table under
  # HEADER (after its |---| line), up to the first line that is not a row.
  firstColumn =
    text: header:
    let
      all = filter isString (split "\n" text);
      step =
        acc: line:
        if acc.state == "before" then
          acc // { state = if line == header then "separator" else "before"; }
        else if acc.state == "separator" then
          acc // { state = "rows"; }
        else if acc.state == "rows" && match "\\|.*" line != null then
          let
            m = match "\\| `?([^ `|]+)`? \\|.*" line;
          in
          acc // { cells = acc.cells ++ [ (if m == null then line else elemAt m 0) ]; }
        else
          acc // { state = "after"; };
      result = foldl' step {
        state = "before";
        cells = [ ];
      } all;
    in
    if length all == 0 then [ ] else result.cells;
in
{
  inherit names firstColumn;
  rendered = {
    keyProxy = lines (
      [
        "| flavor | key | the agent is pointed at the proxy by | upstream, header | methods, paths |"
        "| --- | --- | --- | --- | --- |"
      ]
      ++ builtins.concatMap (name: map (keyProxyRow name) flavors.${name}.keyProxy) names
    );
    agents = lines (
      [
        "| agent | package | command | key variable | config dir |"
        "| --- | --- | --- | --- | --- |"
      ]
      ++ map agentRow names
    );
  };
}
