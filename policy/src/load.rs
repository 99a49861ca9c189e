//! Loading a policy directory: parse every `.cedar` file, give each policy its `@id`, link
//! templates from `links.toml`, parse `@quota`, validate in strict mode against the schema.
//!
//! Directory layout: every `*.cedar` file below the directory (sorted by path) and an
//! optional `links.toml` at its top:
//! ```toml
//! [[link]]
//! id = "shop-may-call-orders"          # the linked policy's id
//! template = "namespace-may-call"      # the template's @id
//! principal = 'Namespace::"east.example/shop"'   # for ?principal, if the template has it
//! resource = 'Service::"orders.shop.west"'       # for ?resource, if the template has it
//! ```
//! A policy without `@id` gets `<file>#<n>` (its position in the file, from 0).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use aws_lc_rs::digest;
use cedar_policy::{
    Effect, EntityUid, PolicyId, PolicySet, Schema, SlotId, ValidationMode, Validator,
};
use serde::Deserialize;
use thiserror::Error;

use crate::diag::PolicyDiagnostic;
use crate::quota::QuotaSpec;

/// The schema shipped with meshgate (`policy/schema/mesh.cedarschema`).
pub const MESH_SCHEMA: &str = include_str!("../schema/mesh.cedarschema");
/// The name the shipped schema goes by in diagnostics.
const MESH_SCHEMA_NAME: &str = "<meshgate>/mesh.cedarschema";
/// The template-links file at the top of a policy directory.
pub const LINKS_FILE: &str = "links.toml";
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
const MAX_FILES: usize = 10_000;

/// One source file of a policy set (or its schema).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// The name diagnostics show, e.g. `policies/shop.cedar`.
    pub name: String,
    /// The file's text.
    pub text: String,
}

/// The content hash of a policy set and its schema (hex SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyVersion(String);

impl PolicyVersion {
    /// The version as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PolicyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a policy set could not be loaded. The set in service (if any) stays.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file or directory could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is too large, or there are too many files.
    #[error("`{0}` is too large (over 4 MiB, or over 10000 files)")]
    TooLarge(PathBuf),
    /// The directory holds no `.cedar` file (refused: it is more likely a wrong path than an
    /// intended deny-all).
    #[error("no `.cedar` policy files in `{0}`")]
    NoPolicies(PathBuf),
    /// The schema or policies are invalid; each diagnostic names file, line and column.
    #[error("{}", render_all(.0))]
    Invalid(Vec<PolicyDiagnostic>),
}

impl LoadError {
    /// The diagnostics, for an invalid set.
    pub fn diagnostics(&self) -> &[PolicyDiagnostic] {
        match self {
            Self::Invalid(d) => d,
            _ => &[],
        }
    }
}

fn render_all(diags: &[PolicyDiagnostic]) -> String {
    let n = diags.len();
    let mut out = format!(
        "{n} problem{} in the policy set\n",
        if n == 1 { "" } else { "s" }
    );
    for d in diags {
        out.push('\n');
        out.push_str(d.rendered.trim_end());
        out.push('\n');
    }
    out
}

/// A loaded, validated policy set.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The policies, sliced by resource for evaluation (see `slice`).
    pub sliced: crate::slice::Sliced,
    /// The action hierarchy (`Action::"GET" in Action::"read"`) from the schema, computed
    /// once: requests are built without per-request schema checks (see `facts::build`).
    pub actions: crate::facts::Actions,
    /// The entities of each (caller, service) pair seen with this set, built once.
    pub subjects: crate::subject::SubjectCache,
    /// Which per-request parts the set can observe at all.
    pub reads: crate::subject::Reads,
    pub version: PolicyVersion,
    /// `@quota` of each permit that has one, by policy id.
    pub quotas: HashMap<String, QuotaSpec>,
    /// The whole set and the schema it was validated against, for proofs (`prove`).
    pub set: PolicySet,
    pub schema: Schema,
    pub stats: LoadStats,
}

/// What a loaded set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct LoadStats {
    /// Static policies.
    pub policies: usize,
    /// Templates.
    pub templates: usize,
    /// Template-linked policies.
    pub links: usize,
}

/// Reads a policy directory and an optional schema file.
pub(crate) fn load_dir(dir: &Path, schema: Option<&Path>) -> Result<Loaded, LoadError> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    if !files.iter().any(|f| f.name.ends_with(".cedar")) {
        return Err(LoadError::NoPolicies(dir.to_path_buf()));
    }
    let schema = schema.map(read_file).transpose()?;
    load_sources(&files, schema.as_ref())
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<SourceFile>) -> Result<(), LoadError> {
    fn io(path: &Path) -> impl Fn(std::io::Error) -> LoadError + '_ {
        move |source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(io(&path))?;
        if ty.is_dir() {
            collect(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "cedar")
            || (dir == root && entry.file_name() == LINKS_FILE)
        {
            if out.len() >= MAX_FILES {
                return Err(LoadError::TooLarge(root.to_path_buf()));
            }
            out.push(read_file(&path)?);
        }
    }
    Ok(())
}

pub(crate) fn read_file(path: &Path) -> Result<SourceFile, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(LoadError::TooLarge(path.to_path_buf()));
    }
    let bytes = fs::read(path).map_err(io)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8",
        ))
    })?;
    Ok(SourceFile {
        name: path.display().to_string(),
        text,
    })
}

/// Builds a validated set from in-memory sources: `.cedar` files and at most one file whose
/// name ends in `links.toml`. `schema` defaults to the shipped one.
pub(crate) fn load_sources(
    files: &[SourceFile],
    schema: Option<&SourceFile>,
) -> Result<Loaded, LoadError> {
    let mut diags = Vec::new();
    let (schema_name, schema_text) = match schema {
        Some(s) => (s.name.as_str(), s.text.as_str()),
        None => (MESH_SCHEMA_NAME, MESH_SCHEMA),
    };
    let schema = match Schema::from_cedarschema_str(schema_text) {
        Ok((schema, _warnings)) => Some(schema),
        Err(e) => {
            diags.push(PolicyDiagnostic::from_diagnostic(
                &e,
                schema_name,
                schema_text,
            ));
            None
        }
    };

    let mut set = PolicySet::new();
    let mut origin: HashMap<String, usize> = HashMap::new(); // policy id -> file index
    let mut stats = LoadStats::default();
    for (idx, _) in files
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name.ends_with(".cedar"))
    {
        add_file(&mut set, &mut origin, &mut stats, files, idx, &mut diags);
    }
    if let Some(links) = files.iter().find(|f| f.name.ends_with(LINKS_FILE)) {
        link_all(&mut set, &mut origin, &mut stats, links, &mut diags);
    }
    let quotas = parse_quotas(&set, &origin, files, &mut diags);

    if let Some(schema) = &schema {
        let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        for err in result.validation_errors() {
            let file = origin
                .get(&err.policy_id().to_string())
                .and_then(|i| files.get(*i));
            let (name, text) =
                file.map_or(("<unknown>", ""), |f| (f.name.as_str(), f.text.as_str()));
            diags.push(PolicyDiagnostic::from_diagnostic(err, name, text));
        }
    }
    match schema {
        Some(schema) if diags.is_empty() => {
            let version = version_of(files, schema_text);
            let sliced = crate::slice::Sliced::new(&set).map_err(|e| {
                LoadError::Invalid(vec![PolicyDiagnostic::at(
                    "<policy set>",
                    "",
                    None,
                    format!("cannot index the policy set: {e}"),
                    None,
                )])
            })?;
            let actions = match schema.action_entities() {
                Ok(entities) => crate::facts::index_actions(&entities),
                Err(e) => {
                    return Err(LoadError::Invalid(vec![PolicyDiagnostic::from_diagnostic(
                        &e, "<schema>", "",
                    )]));
                }
            };
            Ok(Loaded {
                actions,
                reads: crate::subject::Reads::of(&set),
                subjects: crate::subject::SubjectCache::default(),
                sliced,
                version,
                quotas,
                stats,
                set,
                schema,
            })
        }
        _ => Err(LoadError::Invalid(diags)),
    }
}

/// Parses one `.cedar` file and adds its policies and templates under their `@id`.
fn add_file(
    set: &mut PolicySet,
    origin: &mut HashMap<String, usize>,
    stats: &mut LoadStats,
    files: &[SourceFile],
    idx: usize,
    diags: &mut Vec<PolicyDiagnostic>,
) {
    let Some(file) = files.get(idx) else { return };
    let parsed = match PolicySet::from_str(&file.text) {
        Ok(p) => p,
        Err(errs) => {
            for e in errs.iter() {
                diags.push(PolicyDiagnostic::from_diagnostic(e, &file.name, &file.text));
            }
            return;
        }
    };
    // Cedar numbers a file's policies `policy0`, `policy1`, … in source order.
    let auto_index = |id: &PolicyId| {
        id.to_string()
            .strip_prefix("policy")
            .and_then(|n| n.parse::<usize>().ok())
    };
    let mut claim = |id: String, diags: &mut Vec<PolicyDiagnostic>| -> Option<PolicyId> {
        if let Some(prev) = origin.get(&id) {
            let prev = files.get(*prev).map_or("", |f| f.name.as_str());
            let span = annotation_span(&file.text, "id", &id);
            diags.push(PolicyDiagnostic::at(
                &file.name,
                &file.text,
                span,
                format!("duplicate policy id `{id}`"),
                Some(format!(
                    "`{id}` is already used in `{prev}`; every @id must be unique in the set"
                )),
            ));
            return None;
        }
        origin.insert(id.clone(), idx);
        Some(PolicyId::new(id))
    };
    for p in parsed.policies() {
        let id = p
            .annotation("id")
            .map(str::to_owned)
            .unwrap_or_else(|| auto_id(&file.name, auto_index(p.id())));
        if let Some(new) = claim(id, diags)
            && set.add(p.new_id(new)).is_ok()
        {
            stats.policies += 1;
        }
    }
    for t in parsed.templates() {
        let id = t
            .annotation("id")
            .map(str::to_owned)
            .unwrap_or_else(|| auto_id(&file.name, auto_index(t.id())));
        if let Some(new) = claim(id, diags)
            && set.add_template(t.new_id(new)).is_ok()
        {
            stats.templates += 1;
        }
    }
}

fn auto_id(file: &str, index: Option<usize>) -> String {
    format!("{file}#{}", index.unwrap_or(0))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinksFile {
    #[serde(default)]
    link: Vec<Link>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Link {
    id: String,
    template: String,
    principal: Option<String>,
    resource: Option<String>,
}

/// Links templates as `links.toml` says.
fn link_all(
    set: &mut PolicySet,
    origin: &mut HashMap<String, usize>,
    stats: &mut LoadStats,
    file: &SourceFile,
    diags: &mut Vec<PolicyDiagnostic>,
) {
    let links: LinksFile = match toml::from_str(&file.text) {
        Ok(l) => l,
        Err(e) => {
            let span = e
                .span()
                .map(|r| (r.start, r.end.saturating_sub(r.start).max(1)));
            let msg = e.message().to_owned();
            diags.push(PolicyDiagnostic::at(
                &file.name,
                &file.text,
                span,
                format!("malformed links file: {msg}"),
                None,
            ));
            return;
        }
    };
    for link in links.link {
        let span = find(&file.text, &format!("\"{}\"", link.id));
        let mut fail = |message: String, help: Option<String>| {
            diags.push(PolicyDiagnostic::at(
                &file.name, &file.text, span, message, help,
            ));
        };
        if origin.contains_key(&link.id) {
            fail(format!("duplicate policy id `{}`", link.id), None);
            continue;
        }
        let mut vals = HashMap::new();
        let mut bad = false;
        for (slot, value) in [
            (SlotId::principal(), &link.principal),
            (SlotId::resource(), &link.resource),
        ] {
            if let Some(v) = value {
                match EntityUid::from_str(v) {
                    Ok(uid) => {
                        vals.insert(slot, uid);
                    }
                    Err(e) => {
                        fail(
                            format!("`{v}` is not an entity reference: {e}"),
                            Some("write it like `Namespace::\"east.example/shop\"`".to_owned()),
                        );
                        bad = true;
                    }
                }
            }
        }
        if bad {
            continue;
        }
        match set.link(PolicyId::new(&link.template), PolicyId::new(&link.id), vals) {
            Ok(()) => {
                if let Some(t) = origin.get(&link.template).copied() {
                    origin.insert(link.id.clone(), t);
                }
                stats.links += 1;
            }
            Err(e) => fail(
                format!(
                    "cannot link template `{}` as `{}`: {e}",
                    link.template, link.id
                ),
                Some(
                    "the template must exist (by its @id) and every slot it has must be given"
                        .to_owned(),
                ),
            ),
        }
    }
}

/// Parses `@quota` on every permit; a quota on a forbid is an error too.
fn parse_quotas(
    set: &PolicySet,
    origin: &HashMap<String, usize>,
    files: &[SourceFile],
    diags: &mut Vec<PolicyDiagnostic>,
) -> HashMap<String, QuotaSpec> {
    let mut quotas = HashMap::new();
    let templates = set
        .templates()
        .map(|t| (t.id().to_string(), t.annotation("quota"), t.effect()));
    let policies = set
        .policies()
        .map(|p| (p.id().to_string(), p.annotation("quota"), p.effect()));
    let mut reported: BTreeSet<String> = BTreeSet::new();
    for (id, quota, effect) in policies.chain(templates) {
        let Some(text) = quota else { continue };
        let file = origin.get(&id).and_then(|i| files.get(*i));
        let (name, src) = file.map_or(("<unknown>", ""), |f| (f.name.as_str(), f.text.as_str()));
        let span = annotation_span(src, "quota", text);
        let parsed = if effect == Effect::Forbid {
            Err("`@quota` on a forbid policy has no effect".to_owned())
        } else {
            QuotaSpec::from_str(text).map_err(|e| e.to_string())
        };
        match parsed {
            Ok(mut spec) => {
                spec.policy_id = Some(id.clone());
                quotas.insert(id, spec);
            }
            Err(msg) if reported.insert(format!("{name}:{text}")) => diags.push(PolicyDiagnostic::at(
                name,
                src,
                span,
                format!("in policy `{id}`: {msg}"),
                Some("write it like `@quota(\"100/s burst 20\")`, `@quota(\"600/m key service\")` or `@quota(\"5/s key shared:<name>\")`".to_owned()),
            )),
            Err(_) => {}
        }
    }
    quotas
}

/// The span of `"value"` in `@key("value")`, or of the first `"value"` anywhere.
fn annotation_span(text: &str, key: &str, value: &str) -> Option<(usize, usize)> {
    let needle = format!("\"{value}\"");
    let mut from = 0;
    while let Some(at) = text
        .get(from..)
        .and_then(|t| t.find(&format!("@{key}")))
        .map(|i| i + from)
    {
        let rest = text.get(at..).unwrap_or_default();
        if let Some(v) = rest
            .find(&needle)
            .filter(|v| rest.get(..*v).is_some_and(|s| !s.contains(')')))
        {
            return Some((at + v, needle.len()));
        }
        from = at + 1;
    }
    find(text, &needle)
}

fn find(text: &str, needle: &str) -> Option<(usize, usize)> {
    text.find(needle).map(|i| (i, needle.len()))
}

/// The version: SHA-256 over the contents — each file's kind (`cedar` or `links`) and text,
/// length-prefixed, in text order — and the schema text. Renaming or moving a file does
/// not change it; editing any byte does.
fn version_of(files: &[SourceFile], schema: &str) -> PolicyVersion {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"meshgate.policyset.v1\0");
    let mut parts: Vec<(&str, &str)> = files
        .iter()
        .map(|f| {
            (
                if f.name.ends_with(LINKS_FILE) {
                    "links"
                } else {
                    "cedar"
                },
                f.text.as_str(),
            )
        })
        .collect();
    parts.sort_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)));
    for (kind, text) in parts {
        for part in [kind.as_bytes(), text.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
    }
    ctx.update(&(schema.len() as u64).to_be_bytes());
    ctx.update(schema.as_bytes());
    PolicyVersion(hex::encode(ctx.finish().as_ref()))
}
