//! The id_tag → external_subscription_id map, parsed and validated from TOML or CSV text.
//!
//! Reading the file and reloading it on SIGHUP is the caller's; a map with any error is
//! rejected whole so a half-valid file never replaces a good one.

use std::collections::HashMap;

/// One problem in a map file, with its 1-based line (0 when the format gives none).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct MapError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// A validated id_tag → external_subscription_id map. idTags are OCPP `CiString20Type`
/// (case-insensitive), so `04a1b2c3d4` and `04A1B2C3D4` are one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionMap {
    /// Keyed by the ASCII upper case of the id_tag.
    by_id_tag: HashMap<String, String>,
}

impl SubscriptionMap {
    /// The external_subscription_id of `id_tag` (in any case), if mapped.
    pub fn get(&self, id_tag: &str) -> Option<&str> {
        self.by_id_tag
            .get(&id_tag.to_ascii_uppercase())
            .map(String::as_str)
    }

    /// Number of mapped id tags.
    pub fn len(&self) -> usize {
        self.by_id_tag.len()
    }

    /// Whether no id tag is mapped.
    pub fn is_empty(&self) -> bool {
        self.by_id_tag.is_empty()
    }

    fn insert(&mut self, line: usize, id_tag: &str, sub: &str, errors: &mut Vec<MapError>) {
        let (id_tag, sub) = (id_tag.trim(), sub.trim());
        let mut err = |message: String| errors.push(MapError { line, message });
        if id_tag.is_empty() {
            err("empty id_tag".into());
        } else if sub.is_empty() {
            err(format!(
                "empty external_subscription_id for id_tag {id_tag:?}"
            ));
        } else if let Some(previous) = self.by_id_tag.get(&id_tag.to_ascii_uppercase()) {
            if previous != sub {
                err(format!(
                    "id_tag {id_tag:?} mapped twice ({previous:?} and {sub:?}; idTags are case-insensitive)"
                ));
            }
        } else {
            self.by_id_tag
                .insert(id_tag.to_ascii_uppercase(), sub.to_owned());
        }
    }

    /// Parses `id_tag,external_subscription_id` lines; `#` comments, blank lines and an
    /// `id_tag,external_subscription_id` header are allowed; quoting is not.
    pub fn from_csv(text: &str) -> Result<SubscriptionMap, Vec<MapError>> {
        let mut map = SubscriptionMap::default();
        let mut errors = Vec::new();
        for (i, raw_line) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw_line.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            if content.contains('"') {
                errors.push(MapError {
                    line,
                    message: "quoted fields are not supported".into(),
                });
                continue;
            }
            let fields: Vec<&str> = content.split(',').collect();
            if fields.len() != 2 {
                errors.push(MapError {
                    line,
                    message: format!("expected 2 comma-separated fields, found {}", fields.len()),
                });
                continue;
            }
            if line == 1
                && fields[0].trim() == "id_tag"
                && fields[1].trim() == "external_subscription_id"
            {
                continue;
            }
            map.insert(line, fields[0], fields[1], &mut errors);
        }
        if errors.is_empty() {
            Ok(map)
        } else {
            Err(errors)
        }
    }

    /// Parses a TOML table of `"id_tag" = "external_subscription_id"`, at the top level or
    /// under `[subscriptions]`.
    pub fn from_toml(text: &str) -> Result<SubscriptionMap, Vec<MapError>> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            vec![MapError {
                line: e.span().map(|s| line_of(s.start)).unwrap_or(0),
                message: e.message().to_owned(),
            }]
        })?;
        let table = match table.get("subscriptions") {
            Some(toml::Value::Table(inner)) if table.len() == 1 => inner.clone(),
            _ => table,
        };
        let find_line = |key: &str| {
            text.lines()
                .position(|l| {
                    let l = l.trim_start();
                    l.starts_with(key) || l.starts_with(&format!("\"{key}\""))
                })
                .map(|i| i + 1)
                .unwrap_or(0)
        };
        let mut map = SubscriptionMap::default();
        let mut errors = Vec::new();
        for (id_tag, value) in &table {
            match value.as_str() {
                Some(sub) => map.insert(find_line(id_tag), id_tag, sub, &mut errors),
                None => errors.push(MapError {
                    line: find_line(id_tag),
                    message: format!("id_tag {id_tag:?}: value must be a string"),
                }),
            }
        }
        if errors.is_empty() {
            Ok(map)
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_ok_and_errors() {
        let map = SubscriptionMap::from_csv(
            "id_tag,external_subscription_id\n# fleet\nTAG1, sub_1\n\nTAG2,sub_2\nTAG1,sub_1\n",
        )
        .unwrap();
        assert_eq!(map.get("TAG1"), Some("sub_1"));
        assert_eq!(map.get("TAG2"), Some("sub_2"));
        assert_eq!(map.len(), 2);
        let errors =
            SubscriptionMap::from_csv("A,1\nB\n,x\nC,\nA,2\n\"D\",3\nE,1,2\n").unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn id_tags_match_in_any_case() {
        let map = SubscriptionMap::from_csv("04A1B2C3D4,sub_a\n").unwrap();
        assert_eq!(map.get("04a1b2c3d4"), Some("sub_a"));
        assert_eq!(map.get("04A1b2C3d4"), Some("sub_a"));
        let errors = SubscriptionMap::from_csv("abc,sub_1\nABC,sub_2\nAbc,sub_1\n").unwrap_err();
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn toml_ok_and_errors() {
        let map = SubscriptionMap::from_toml("TAG1 = \"sub_1\"\n\"TAG 2\" = \"sub_2\"\n").unwrap();
        assert_eq!(map.get("TAG 2"), Some("sub_2"));
        let map = SubscriptionMap::from_toml("[subscriptions]\nTAG1 = \"sub_1\"\n").unwrap();
        assert_eq!(map.get("TAG1"), Some("sub_1"));
        let errors = SubscriptionMap::from_toml("A = \"x\"\nB = 3\nC = \"\"\n").unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3]);
        let errors = SubscriptionMap::from_toml("A = \"x\"\nB = \n").unwrap_err();
        assert_eq!(errors[0].line, 2);
    }
}
