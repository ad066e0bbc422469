# A small, pure TOML renderer for the shapes the guest spec needs:
# top-level scalars, tables of scalars (nested tables become [a.b]),
# arrays of tables ([[name]]), strings, integers, booleans and arrays of
# scalars. Anything else (floats, null, functions, mixed arrays) throws, so
# a bad value fails the build instead of producing a spec the runner misreads.
#
# Key order: attribute names are sorted (Nix attrsets are), and within one
# table scalars come before sub-tables and arrays of tables, as TOML needs.
let
  inherit (builtins)
    all
    any
    attrNames
    concatStringsSep
    elemAt
    filter
    fromJSON
    genList
    isAttrs
    isBool
    isInt
    isList
    isString
    length
    map
    match
    replaceStrings
    substring
    typeOf
    ;

  hexDigits = "0123456789ABCDEF";
  hex4 = n: "00${substring (n / 16) 1 hexDigits}${substring (n - n / 16 * 16) 1 hexDigits}";

  # Control characters U+0001..U+001F and U+007F, built with fromJSON because
  # Nix string literals cannot spell most of them. (Nix strings cannot hold
  # U+0000 at all.)
  controlCodes = genList (i: i + 1) 31 ++ [ 127 ];
  controlChars = map (n: fromJSON "\"\\u${hex4 n}\"") controlCodes;
  shortEscapes = {
    "8" = "\\b";
    "9" = "\\t";
    "10" = "\\n";
    "12" = "\\f";
    "13" = "\\r";
  };
  controlEscapes = map (n: shortEscapes.${toString n} or "\\u${hex4 n}") controlCodes;

  # TOML basic string: backslash first, then quote, then control characters.
  escapeString =
    s: replaceStrings ([ "\\" "\"" ] ++ controlChars) ([ "\\\\" "\\\"" ] ++ controlEscapes) s;

  quoteString = s: "\"${escapeString s}\"";

  renderKey = k: if match "[A-Za-z0-9_-]+" k != null then k else quoteString k;

  renderPath = path: concatStringsSep "." (map renderKey path);

  isTable = isAttrs;
  isArrayOfTables = v: isList v && v != [ ] && all isAttrs v;

  fail = path: msg: throw "toml.render: ${if path == [ ] then "<root>" else renderPath path}: ${msg}";

  renderScalar =
    path: v:
    if isString v then
      quoteString v
    else if isBool v then
      (if v then "true" else "false")
    else if isInt v then
      toString v
    else if isList v then
      (
        if any (x: isList x || isAttrs x) v then
          fail path "arrays of arrays or mixed arrays are not supported"
        else
          "[${concatStringsSep ", " (map (renderScalar path) v)}]"
      )
    else
      fail path "cannot render a value of type ${typeOf v}";

  # One table body: its scalar keys, then its sub-tables, then its arrays of
  # tables, each with its own header.
  renderTable =
    path: attrs:
    let
      names = attrNames attrs;
      scalarNames = filter (n: !(isTable attrs.${n}) && !(isArrayOfTables attrs.${n})) names;
      tableNames = filter (n: isTable attrs.${n}) names;
      arrayNames = filter (n: isArrayOfTables attrs.${n}) names;
      scalarLines = map (n: "${renderKey n} = ${renderScalar (path ++ [ n ]) attrs.${n}}\n") scalarNames;
      section = header: body: "\n${header}\n${body}";
      tables = map (
        n: section "[${renderPath (path ++ [ n ])}]" (renderTable (path ++ [ n ]) attrs.${n})
      ) tableNames;
      arrays = map (
        n:
        concatStringsSep "" (
          map (item: section "[[${renderPath (path ++ [ n ])}]]" (renderTable (path ++ [ n ]) item)) attrs.${n}
        )
      ) arrayNames;
    in
    concatStringsSep "" (scalarLines ++ tables ++ arrays);

  render =
    value:
    if !(isAttrs value) then
      throw "toml.render: the document must be an attribute set"
    else
      let
        text = renderTable [ ] value;
      in
      # A document that starts with a table header has a leading blank line.
      if substring 0 1 text == "\n" then substring 1 (-1) text else text;
in
{
  inherit render escapeString quoteString;
  # Exposed for tests.
  internal = {
    inherit renderKey renderScalar;
    controlCount = length controlChars;
    firstControl = elemAt controlChars 0;
  };
}
