//! PEFT's module-selection rules (`target_modules`, `exclude_modules`, `layers_to_transform`/`layers_pattern`,
//! `rank_pattern`/`alpha_pattern`), shared by every method crate.
//!
//! Semantics follow `peft/tuners/tuners_utils.py::check_target_module_exists`:
//! - a **string** pattern is a regular expression that must match the whole module path;
//! - a **list** matches a path that equals an entry or ends with `"." + entry`;
//! - `"all-linear"` matches every linear site except the model's output layer (the caller says which that is);
//! - `layers_to_transform` keeps only list-matched paths whose layer index is listed. The index is the
//!   all-digit segment after a `layers_pattern` segment (each pattern a regular expression, tried in order), or
//!   after any segment when no pattern is given; the segment must not be the path's first and the number must
//!   be followed by another segment, and the **last** such number in the path counts (PEFT matches
//!   `.*\.{pattern}\.(\d+)\.` greedily, or `.*\.[^.]*\.(\d+)\.` without a pattern). An empty list means no
//!   restriction. As in PEFT, a path named in full in the target list, and every regex target, is not filtered
//!   by layer (LoRA's config refuses `layers_to_transform` with a regex target);
//! - `rank_pattern`/`alpha_pattern` keys are tried in insertion order with `(.*\.)?(key)$`; the first hit wins.
//!
//! Python's `re` and Rust's `regex` differ in rare constructs (look-around, backreferences); such a pattern is a
//! typed error here rather than a silent mismatch.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `target_modules` / `exclude_modules` as PEFT stores them: a regex string or a list of names/suffixes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModulePattern {
    /// A regular expression matched against the whole path (or `"all-linear"`).
    Regex(String),
    /// Names that match a path exactly or as a dotted suffix.
    List(Vec<String>),
}

impl ModulePattern {
    /// A list pattern from names.
    pub fn list<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        ModulePattern::List(names.into_iter().map(Into::into).collect())
    }

    fn describe(&self) -> Vec<String> {
        match self {
            ModulePattern::Regex(s) => vec![s.clone()],
            ModulePattern::List(v) => v.clone(),
        }
    }
}

/// A compiled [`ModulePattern`].
#[derive(Clone, Debug)]
enum Compiled {
    AllLinear,
    Regex(Regex),
    List(Vec<String>),
}

fn full_regex(op: &'static str, p: &str) -> Result<Regex> {
    Regex::new(&format!(r"\A(?:{p})\z")).map_err(|e| Error::Pattern { op, pattern: p.to_string(), source: Box::new(e) })
}

impl Compiled {
    fn new(p: &ModulePattern) -> Result<Self> {
        Ok(match p {
            ModulePattern::Regex(s) if s == "all-linear" => Compiled::AllLinear,
            ModulePattern::Regex(s) => Compiled::Regex(full_regex("target_modules", s)?),
            ModulePattern::List(v) => Compiled::List(v.clone()),
        })
    }

    /// True when a match of `path` is subject to `layers_to_transform`: PEFT filters only list targets matched
    /// by suffix, not a path named in full and not a regex.
    fn filters_layers(&self, path: &str) -> bool {
        match self {
            Compiled::List(v) => !v.iter().any(|t| t == path),
            Compiled::AllLinear | Compiled::Regex(_) => false,
        }
    }

    fn matches(&self, path: &str, is_output_layer: bool) -> bool {
        match self {
            Compiled::AllLinear => !is_output_layer,
            Compiled::Regex(r) => r.is_match(path),
            Compiled::List(v) => v.iter().any(|t| path == t || path.ends_with(&format!(".{t}"))),
        }
    }
}

/// The selection part of an adapter config, compiled once and applied to every site path.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    target: Compiled,
    target_src: ModulePattern,
    exclude: Option<Compiled>,
    layers: Option<Vec<usize>>,
    layer_re: Vec<Regex>,
    modules_to_save: Vec<String>,
}

impl TargetSpec {
    /// Compiles the selection rules. `layers_to_transform: Some(&[])` means no restriction, as in PEFT.
    ///
    /// # Errors
    /// [`Error::Pattern`] for a pattern (target, exclude or layers) the regex engine rejects.
    pub fn new(
        target: &ModulePattern,
        exclude: Option<&ModulePattern>,
        layers_to_transform: Option<&[usize]>,
        layers_pattern: Option<&[String]>,
        modules_to_save: &[String],
    ) -> Result<Self> {
        Ok(TargetSpec {
            target: Compiled::new(target)?,
            target_src: target.clone(),
            exclude: exclude.map(Compiled::new).transpose()?,
            layers: layers_to_transform.filter(|l| !l.is_empty()).map(<[usize]>::to_vec),
            layer_re: layer_regexes(layers_pattern)?,
            modules_to_save: modules_to_save.to_vec(),
        })
    }

    /// A spec from a plain list of names/suffixes and nothing else.
    ///
    /// # Errors
    /// Never in practice (lists need no compiling); kept fallible for uniformity.
    pub fn names<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Result<Self> {
        Self::new(&ModulePattern::list(names), None, None, None, &[])
    }

    /// True when the site at `path` is selected. `is_output_layer` marks the model's output projection, which
    /// `"all-linear"` skips.
    pub fn matches(&self, path: &str, is_output_layer: bool) -> bool {
        if self.modules_to_save.iter().any(|m| in_module(path, m)) {
            return false;
        }
        if !self.target.matches(path, is_output_layer) {
            return false;
        }
        if let Some(ex) = &self.exclude {
            if ex.matches(path, false) {
                return false;
            }
        }
        match &self.layers {
            Some(layers) if self.target.filters_layers(path) => {
                layer_index_re(path, &self.layer_re).is_some_and(|i| layers.contains(&i))
            }
            _ => true,
        }
    }

    /// Selects the matching paths from `paths` (with their output-layer flag), keeping order.
    ///
    /// # Errors
    /// [`Error::NoTargetMatched`] when nothing matches: an adapter that silently attaches nowhere is a bug.
    pub fn select<'a>(&self, paths: impl IntoIterator<Item = (&'a str, bool)>) -> Result<Vec<String>> {
        let hits: Vec<String> =
            paths.into_iter().filter(|(p, out)| self.matches(p, *out)).map(|(p, _)| p.to_string()).collect();
        if hits.is_empty() {
            return Err(Error::NoTargetMatched { patterns: self.target_src.describe() });
        }
        Ok(hits)
    }
}

/// `(^|.*\.)m($|\..*)`: `path` is module `m` or inside it.
fn in_module(path: &str, m: &str) -> bool {
    path == m
        || path.starts_with(&format!("{m}."))
        || path.contains(&format!(".{m}."))
        || path.ends_with(&format!(".{m}"))
}

/// The layer regexes PEFT's `check_target_module_exists` builds: `.*\.{pattern}\.(\d+)\.` per pattern, or
/// `.*\.[^.]*\.(\d+)\.` when there is none (an empty list or an empty string counts as none).
fn layer_regexes(layers_pattern: Option<&[String]>) -> Result<Vec<Regex>> {
    let pats: Vec<&String> = layers_pattern.unwrap_or_default().iter().filter(|p| !p.is_empty()).collect();
    let compile = |p: &str| {
        Regex::new(&format!(r"\A.*\.{p}\.(\d+)\.")).map_err(|e| Error::Pattern {
            op: "layers_pattern",
            pattern: p.to_string(),
            source: Box::new(e),
        })
    };
    if pats.is_empty() {
        return Ok(vec![compile("[^.]*")?]);
    }
    pats.into_iter().map(|p| compile(&format!("(?:{p})"))).collect()
}

/// The index of the first regex that matches, read from its last (greedy) match in `path`.
fn layer_index_re(path: &str, res: &[Regex]) -> Option<usize> {
    res.iter().find_map(|re| re.captures(path)).and_then(|c| c.get(1)).and_then(|m| m.as_str().parse().ok())
}

/// The layer index PEFT reads from a module path: the all-digit segment after a `layers_pattern` match (or after
/// any non-first segment without a pattern), last occurrence, followed by at least one more segment.
///
/// # Errors
/// [`Error::Pattern`] for a pattern the regex engine rejects.
pub fn layer_index(path: &str, layers_pattern: Option<&[String]>) -> Result<Option<usize>> {
    Ok(layer_index_re(path, &layer_regexes(layers_pattern)?))
}

/// An ordered `rank_pattern` / `alpha_pattern`: keys tried in order with `(.*\.)?(key)$`, first hit wins.
#[derive(Clone, Debug, Default)]
pub struct PatternMap<V> {
    entries: Vec<(String, Regex, V)>,
}

impl<V: Clone> PatternMap<V> {
    /// Compiles the (key, value) pairs in their given order.
    ///
    /// # Errors
    /// [`Error::Pattern`] for a key the regex engine rejects.
    pub fn new(pairs: impl IntoIterator<Item = (String, V)>) -> Result<Self> {
        let entries = pairs
            .into_iter()
            .map(|(k, v)| {
                let re = Regex::new(&format!(r"\A(?:.*\.)?(?:{k})\z")).map_err(|e| Error::Pattern {
                    op: "rank_pattern",
                    pattern: k.clone(),
                    source: Box::new(e),
                })?;
                Ok((k, re, v))
            })
            .collect::<Result<_>>()?;
        Ok(PatternMap { entries })
    }

    /// The value of the first key matching `path`.
    pub fn lookup(&self, path: &str) -> Option<V> {
        self.entries.iter().find(|(_, re, _)| re.is_match(path)).map(|(_, _, v)| v.clone())
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PATHS: [&str; 6] = [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.key",
        "encoder.layer.11.output.dense",
        "classifier",
    ];

    fn sel(spec: &TargetSpec) -> Vec<String> {
        spec.select(PATHS.iter().map(|p| (*p, *p == "classifier"))).unwrap_or_default()
    }

    #[test]
    fn list_matches_exact_name_or_dotted_suffix_only() {
        let s = TargetSpec::names(["query"]).unwrap();
        assert_eq!(sel(&s), vec![PATHS[0], PATHS[2]]);
        // "uery" is a suffix of the string but not on a dot boundary.
        assert!(TargetSpec::names(["uery"]).unwrap().select(PATHS.iter().map(|p| (*p, false))).is_err());
        let s = TargetSpec::names(["self.value"]).unwrap();
        assert_eq!(sel(&s), vec![PATHS[1]]);
    }

    #[test]
    fn string_is_a_full_match_regex() {
        let s = TargetSpec::new(&ModulePattern::Regex(r".*\.(query|key)".into()), None, None, None, &[]).unwrap();
        assert_eq!(sel(&s), vec![PATHS[0], PATHS[2], PATHS[3]]);
        // a partial match is not enough
        let s = TargetSpec::new(&ModulePattern::Regex("query".into()), None, None, None, &[]).unwrap();
        assert!(s.select(PATHS.iter().map(|p| (*p, false))).is_err());
    }

    #[test]
    fn all_linear_skips_the_output_layer() {
        let s = TargetSpec::new(&ModulePattern::Regex("all-linear".into()), None, None, None, &[]).unwrap();
        assert_eq!(sel(&s).len(), 5);
        assert!(!sel(&s).contains(&"classifier".to_string()));
    }

    #[test]
    fn exclude_layers_and_modules_to_save_refine_the_match() {
        let ex = ModulePattern::list(["key"]);
        let s = TargetSpec::new(&ModulePattern::Regex(r".*attention.*".into()), Some(&ex), None, None, &[]).unwrap();
        assert_eq!(sel(&s), vec![PATHS[0], PATHS[1], PATHS[2]]);
        let s = TargetSpec::new(&ModulePattern::list(["query", "dense"]), None, Some(&[1, 11]), None, &[]).unwrap();
        assert_eq!(sel(&s), vec![PATHS[2], PATHS[4]]);
        let pat = vec!["layer".to_string()];
        let s = TargetSpec::new(&ModulePattern::list(["query"]), None, Some(&[0]), Some(&pat), &[]).unwrap();
        assert_eq!(sel(&s), vec![PATHS[0]]);
        let s =
            TargetSpec::new(&ModulePattern::list(["classifier", "query"]), None, None, None, &["classifier".into()])
                .unwrap();
        assert_eq!(sel(&s), vec![PATHS[0], PATHS[2]]);
    }

    /// PEFT's rules (`tuners_utils.check_target_module_exists`): the last numbered segment counts, any segment
    /// name works without a pattern, `[]` is no restriction, patterns are regexes tried in order, a full-path
    /// target is not filtered, a number must be followed by another segment and preceded by a non-first one.
    #[test]
    fn layers_to_transform_follows_peft() {
        let moe = ["model.layers.3.mlp.experts.1.w1", "model.layers.1.mlp.experts.3.w1"];
        let pick = |layers: &[usize], pat: Option<&[String]>, targets: &[&str], paths: &[&str]| {
            let s =
                TargetSpec::new(&ModulePattern::list(targets.iter().copied()), None, Some(layers), pat, &[]).unwrap();
            paths.iter().filter(|p| s.matches(p, false)).map(|p| p.to_string()).collect::<Vec<_>>()
        };
        // last number wins: experts.1 / experts.3
        assert_eq!(pick(&[1], None, &["w1"], &moe), vec![moe[0]]);
        // with a pattern, the number after it
        let layers = vec!["layers".to_string()];
        assert_eq!(pick(&[1], Some(&layers), &["w1"], &moe), vec![moe[1]]);
        // any segment name, not a fixed list
        assert_eq!(pick(&[2], None, &["q"], &["net.stage.2.q", "net.stage.1.q"]), vec!["net.stage.2.q"]);
        // patterns are regexes, tried in order, the first that matches decides
        let re = vec!["stag.".to_string(), "net".to_string()];
        assert_eq!(pick(&[2], Some(&re), &["q"], &["net.stage.2.q", "net.stage.1.q"]), vec!["net.stage.2.q"]);
        // empty list: no restriction
        assert_eq!(pick(&[], None, &["w1"], &moe).len(), 2);
        // a full-path target is not filtered by layer
        assert_eq!(pick(&[7], None, &[moe[0]], &moe), vec![moe[0]]);
        // the number must follow a non-first segment and precede another one
        assert_eq!(pick(&[0], None, &["q"], &["layers.0.q", "x.layers.0"]), Vec::<String>::new());
        assert_eq!(layer_index("a.layers.12.b", None).unwrap(), Some(12));
        assert_eq!(layer_index("a.b12.3.c", None).unwrap(), Some(3));
        assert!(layer_index("a.b", Some(&["(".to_string()])).is_err());
    }

    #[test]
    fn a_pattern_that_matches_nothing_is_an_error_naming_it() {
        let s = TargetSpec::names(["q_proj"]).unwrap();
        match s.select(PATHS.iter().map(|p| (*p, false))) {
            Err(Error::NoTargetMatched { patterns }) => assert_eq!(patterns, vec!["q_proj"]),
            other => panic!("expected NoTargetMatched, got {other:?}"),
        }
    }

    #[test]
    fn unsupported_regex_is_a_typed_error() {
        let r = TargetSpec::new(&ModulePattern::Regex(r"(?<=x)query".into()), None, None, None, &[]);
        assert!(matches!(r, Err(Error::Pattern { .. })));
    }

    #[test]
    fn rank_pattern_first_hit_wins_in_insertion_order() {
        let m = PatternMap::new([("layer.1.*query".to_string(), 4usize), ("query".to_string(), 16)]).unwrap();
        assert_eq!(m.lookup(PATHS[2]), Some(4));
        assert_eq!(m.lookup(PATHS[0]), Some(16));
        assert_eq!(m.lookup(PATHS[1]), None);
        let m = PatternMap::new([("query".to_string(), 16usize), ("layer.1.*query".to_string(), 4)]).unwrap();
        assert_eq!(m.lookup(PATHS[2]), Some(16));
    }

    #[test]
    fn config_json_forms_deserialize() {
        let a: ModulePattern = serde_json::from_str(r#"["query","value"]"#).unwrap();
        assert_eq!(a, ModulePattern::list(["query", "value"]));
        let b: ModulePattern = serde_json::from_str(r#"".*query""#).unwrap();
        assert_eq!(b, ModulePattern::Regex(".*query".into()));
    }

    proptest! {
        #[test]
        fn list_match_is_equality_or_dot_suffix(
            segs in prop::collection::vec("[a-z]{1,4}", 1..5),
            t in "[a-z]{1,4}(\\.[a-z]{1,3})?",
        ) {
            let path = segs.join(".");
            let spec = TargetSpec::names([t.clone()]).unwrap();
            let expected = path == t || path.ends_with(&format!(".{t}"));
            prop_assert_eq!(spec.matches(&path, false), expected);
            // the regex form of an escaped name with an optional dotted prefix agrees with the list form
            let re = ModulePattern::Regex(format!(r"(.*\.)?{}", regex::escape(&t)));
            let spec2 = TargetSpec::new(&re, None, None, None, &[]).unwrap();
            prop_assert_eq!(spec2.matches(&path, false), expected);
        }
    }
}
