//! The crate's top-level modules form a DAG (config → pipeline → stages → model/data, ...):
//! a reader follows behaviour down the graph without going back up. This test reads the
//! sources, collects every `crate::<module>` reference outside comments, and fails on any cycle,
//! naming it; in particular `stages` never refers to `pipeline`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module → the other top-level modules its code names as `crate::<m>`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut modules = BTreeMap::new();
    for e in fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "main" || name == "lib" {
            continue;
        }
        let mut files = Vec::new();
        if p.is_dir() {
            rust_files(&p, &mut files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p.clone());
        } else {
            continue;
        }
        let deps: &mut BTreeSet<String> = modules.entry(name.clone()).or_default();
        for f in files {
            for line in fs::read_to_string(&f).unwrap().lines() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                let code = code.split(" //").next().unwrap_or_default();
                let mut rest = code;
                while let Some(i) = rest.find("crate::") {
                    rest = &rest[i + "crate::".len()..];
                    let m: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !m.is_empty() && m != name {
                        deps.insert(m);
                    }
                }
                // `use crate::{a, b::c}` groups.
                if let Some(i) = code.find("crate::{") {
                    for part in code[i + "crate::{".len()..].split([',', '{', '}']) {
                        let m = part.trim().split("::").next().unwrap_or_default();
                        if !m.is_empty()
                            && m != name
                            && m.chars().all(|c| c.is_alphanumeric() || c == '_')
                        {
                            deps.insert(m.to_string());
                        }
                    }
                }
            }
        }
    }
    modules
}

/// One cycle of the graph, if there is any.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn top_level_modules_form_a_dag() {
    let g = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        g.contains_key("pipeline") && g.contains_key("stages"),
        "{g:?}"
    );
    assert!(
        g["pipeline"].contains("stages"),
        "the runner dispatches to stages: {g:?}"
    );
    assert!(
        !g["stages"].contains("pipeline"),
        "src/stages/ refers to crate::pipeline; the runner depends on stages, not the reverse"
    );
    if let Some(c) = find_cycle(&g) {
        panic!("module cycle: {}\n{g:#?}", c.join(" → "));
    }
}

#[test]
fn the_checker_sees_cycles_and_group_imports() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir_all(tmp.path().join("a")).unwrap();
    fs::write(tmp.path().join("a/mod.rs"), "use crate::{b, c::X};\n").unwrap();
    fs::write(
        tmp.path().join("b.rs"),
        "// crate::c in a comment does not count\nfn f() { crate::a::g() }\n",
    )
    .unwrap();
    fs::write(tmp.path().join("c.rs"), "").unwrap();
    let g = graph(tmp.path());
    assert_eq!(g["a"], BTreeSet::from(["b".to_string(), "c".to_string()]));
    assert_eq!(g["b"], BTreeSet::from(["a".to_string()]));
    assert!(find_cycle(&g).is_some_and(|c| c.contains(&"a".to_string())));
}
