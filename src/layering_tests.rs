//! The layering of ARCHITECTURE.md ("Layering"), checked against the source: every `crate::`
//! path in `src/**/*.rs` (in `use` lines, `use crate::{…}` groups and inline paths; in `main.rs`
//! the `ocpp_lago_bridge::` ones) must name a module its table row allows, every allowed module
//! must sit on a lower layer (so the table itself has no cycle), and no two files import each
//! other, directly or around a loop (`crate::` and top-level `use super::` paths, per file).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Items of the crate root (`lib.rs`) every module may use: it only declares the modules, so
/// it is below all of them.
const ROOT_HELPERS: &[&str] = &["lock", "ensure_rustls_provider"];

/// One row of the table: the module's layer and the modules it may use.
#[derive(Debug)]
struct Row {
    layer: u32,
    may_use: BTreeSet<String>,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The table under `## Layering` in ARCHITECTURE.md: rows `| \`module\` | layer | \`a\`, \`b\` |`.
fn layering_table() -> BTreeMap<String, Row> {
    let text = std::fs::read_to_string(manifest_dir().join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("\n## Layering")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Layering` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut table = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert!(cells.len() >= 4, "malformed layering row: {line}");
        let module = cells[1].trim_matches('`').to_string();
        let layer = cells[2]
            .parse()
            .unwrap_or_else(|_| panic!("layer of `{module}` is not a number: {line}"));
        let may_use = cells[3]
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert!(
            table
                .insert(module.clone(), Row { layer, may_use })
                .is_none(),
            "`{module}` has two rows"
        );
    }
    assert!(!table.is_empty(), "the layering table has no rows");
    table
}

/// Every `.rs` file under `src/`, as paths relative to `src/`.
fn source_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let root = manifest_dir().join("src");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

/// The module path of a file: `proxy/tap.rs` → `[proxy, tap]`, `spool/mod.rs` → `[spool]`,
/// `main.rs` → `[main]`, `lib.rs` → `[]`.
fn module_path(file: &Path) -> Vec<String> {
    let mut parts: Vec<String> = file
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The source without comments (line comments only: block comments are not used in `src/`).
fn code_of(source: &str) -> String {
    source
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands a path starting at `text` (just after `prefix::`) into full paths: `a::b` → `[a, b]`,
/// `{a::b, c::{d, e}}` → `[a, b]`, `[c, d]`, `[c, e]`.
fn expand(prefix: &[String], text: &str, out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        let item = group[start..i].trim();
                        if !item.is_empty() && item != "self" {
                            expand(&path, item, out);
                        } else if item == "self" {
                            out.push(path.clone());
                        }
                        start = i + 1;
                        if c == '}' {
                            return;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            return;
        }
        let end = rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        path.push(rest[..end].to_string());
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(next) => rest = next,
            None => break,
        }
    }
    if path.len() > prefix.len() {
        out.push(path);
    }
}

/// Every path the code names through `root::` (e.g. `crate`), as segments after it.
fn rooted_paths(code: &str, root: &str) -> Vec<Vec<String>> {
    let needle = format!("{root}::");
    let mut out = Vec::new();
    for (at, _) in code.match_indices(&needle) {
        if code[..at].chars().next_back().is_some_and(is_ident_char) {
            continue;
        }
        expand(&[], &code[at + needle.len()..], &mut out);
    }
    out
}

/// The paths of the file's top-level `use super::…` lines, made absolute.
fn super_paths(code: &str, file: &Path) -> Vec<Vec<String>> {
    let mut parent = module_path(file);
    parent.pop();
    let mut out = Vec::new();
    for (at, _) in code.match_indices("use super::") {
        let line_start = code[..at].rfind('\n').map_or(0, |i| i + 1);
        let indent = &code[line_start..at];
        if indent.is_empty() || indent == "pub " || indent == "pub(crate) " {
            expand(&parent, &code[at + "use super::".len()..], &mut out);
        }
    }
    out
}

/// The file a module path lands in: its longest prefix that is a file of `files`.
fn file_of(path: &[String], files: &BTreeSet<PathBuf>) -> Option<PathBuf> {
    (1..=path.len()).rev().find_map(|n| {
        let base: PathBuf = path[..n].iter().collect();
        [base.with_extension("rs"), base.join("mod.rs")]
            .into_iter()
            .find(|f| files.contains(f))
    })
}

/// The top-level modules `code` (of a file of module `module`) names.
fn used_modules(code: &str, module: &str) -> BTreeSet<String> {
    let mut paths = rooted_paths(code, "crate");
    if module == "main" {
        paths.extend(rooted_paths(code, "ocpp_lago_bridge"));
    }
    paths.into_iter().map(|p| p[0].clone()).collect()
}

/// Layering violations of one file: modules it names that its row does not allow.
fn violations(
    file: &Path,
    code: &str,
    table: &BTreeMap<String, Row>,
    modules: &BTreeSet<String>,
) -> Vec<String> {
    let Some(module) = module_path(file).first().cloned() else {
        return Vec::new(); // lib.rs: declarations and the root helpers only
    };
    let Some(row) = table.get(&module) else {
        return vec![format!(
            "src/{}: module `{module}` has no row in ARCHITECTURE.md's layering table",
            file.display()
        )];
    };
    used_modules(code, &module)
        .into_iter()
        .filter(|used| *used != module && !ROOT_HELPERS.contains(&used.as_str()))
        .filter_map(|used| {
            if !modules.contains(&used) {
                Some(format!("src/{}: the crate path `{used}` is neither a module nor a root helper", file.display()))
            } else if !row.may_use.contains(&used) {
                Some(format!(
                    "src/{}: `{module}` uses `{used}`, which its row in ARCHITECTURE.md's layering table does not allow",
                    file.display()
                ))
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn every_import_follows_the_layering_table() {
    let table = layering_table();
    let files = source_files();
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_path(f).first().cloned())
        .collect();
    for module in &modules {
        assert!(
            table.contains_key(module),
            "module `{module}` has no row in ARCHITECTURE.md's layering table"
        );
    }
    let mut problems = Vec::new();
    for (module, row) in &table {
        if !modules.contains(module) {
            problems.push(format!(
                "the layering table names `{module}`, which is not a module"
            ));
        }
        for used in &row.may_use {
            match table.get(used) {
                None => problems.push(format!("`{module}` may use `{used}`, which has no row")),
                Some(lower) if lower.layer >= row.layer => problems.push(format!(
                    "`{module}` (layer {}) may use `{used}` (layer {}): a module may only use lower layers",
                    row.layer, lower.layer
                )),
                Some(_) => {}
            }
        }
    }
    for file in &files {
        let code =
            code_of(&std::fs::read_to_string(manifest_dir().join("src").join(file)).unwrap());
        problems.extend(violations(file, &code, &table, &modules));
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn no_two_files_import_each_other() {
    let files: BTreeSet<PathBuf> = source_files().into_iter().collect();
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for file in &files {
        let code =
            code_of(&std::fs::read_to_string(manifest_dir().join("src").join(file)).unwrap());
        let mut paths = rooted_paths(&code, "crate");
        paths.extend(super_paths(&code, file));
        let targets = paths
            .iter()
            .filter_map(|p| file_of(p, &files))
            .filter(|t| t != file && t != Path::new("lib.rs"))
            .collect();
        edges.insert(file.clone(), targets);
    }
    // Depth-first search for a back edge; the cycle is reported file by file.
    fn visit(
        file: &PathBuf,
        edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        stack: &mut Vec<PathBuf>,
        done: &mut BTreeSet<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        if let Some(at) = stack.iter().position(|f| f == file) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(file.clone());
            return Some(cycle);
        }
        if done.contains(file) {
            return None;
        }
        stack.push(file.clone());
        for next in edges.get(file).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(file.clone());
        None
    }
    let mut done = BTreeSet::new();
    for file in &files {
        if let Some(cycle) = visit(file, &edges, &mut Vec::new(), &mut done) {
            let cycle: Vec<String> = cycle
                .iter()
                .map(|f| format!("src/{}", f.display()))
                .collect();
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_scanner_sees_groups_inline_paths_and_super() {
    // Spelled through `root` so that this file's own scan does not see these paths.
    let root = "crate";
    let code = format!(
        "use {root}::{{a::b, c::{{d, self}}}};\nfn f() {{ {root}::e::g(); not{root}::h(); }}\nuse super::x::Y;\n    use super::z;"
    );
    let code = code.as_str();
    let paths = rooted_paths(code, root);
    let firsts: BTreeSet<&str> = paths.iter().map(|p| p[0].as_str()).collect();
    assert_eq!(firsts, BTreeSet::from(["a", "c", "e"]));
    assert!(paths.contains(&vec!["c".to_string(), "d".to_string()]));
    assert!(paths.contains(&vec!["c".to_string()]));
    let supers = super_paths(code, Path::new("proxy/tap.rs"));
    assert_eq!(
        supers,
        vec![vec!["proxy".to_string(), "x".to_string(), "Y".to_string()]]
    );
}
